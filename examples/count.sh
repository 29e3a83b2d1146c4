#!/bin/sh
# Counts from 1 to 10, half a second apart: the classic websocketd example.
#   herald serve --exec /count=./examples/count.sh    (then open count.html)
#   ./examples/count.sh | herald pub --lines count    (each line to topic "count")
for i in 1 2 3 4 5 6 7 8 9 10; do
  echo "$i"
  sleep 0.5
done
