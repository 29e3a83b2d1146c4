// The classic Node `ws` broadcast server: every message a client sends goes
// to every connected client. Herald's raw mode serves pages written for it.
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] || 8090);
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) client.send(data, { binary: isBinary });
    }
  });
});
wss.on('listening', () => console.log(`ws-broadcast listening on ${port}`));
