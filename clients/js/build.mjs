// Builds the packaged forms of herald.js (the ES module itself is shipped
// as written): dist/herald.cjs for require(), dist/herald.min.js minified,
// and reports their sizes (raw and gzipped).
import { buildSync } from 'esbuild';
import { readFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';

const common = { entryPoints: ['herald.js'], bundle: false, target: 'es2020', logLevel: 'warning' };
buildSync({ ...common, format: 'cjs', outfile: 'dist/herald.cjs' });
buildSync({ ...common, format: 'esm', minify: true, outfile: 'dist/herald.min.js' });
for (const f of ['herald.js', 'dist/herald.cjs', 'dist/herald.min.js']) {
  const b = readFileSync(f);
  console.log(`${f.padEnd(20)} ${String(b.length).padStart(6)} bytes, ${String(gzipSync(b).length).padStart(5)} gzipped`);
}
