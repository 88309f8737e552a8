// Browser end-to-end test: Debian's Chromium, driven by playwright-core,
// uses a running Pinaka as its HTTPS proxy and loads an http:// page, an
// https:// page and a WebSocket from origins this script serves on
// loopback. Chromium answers Pinaka's 407 with Basic credentials (the JWT
// as the password). Then the proxy's request records (its JSON log) must
// show what Chromium did: HTTP/2 to the proxy, CONNECT for https.
//
// Environment (set by run.sh): PROXY_PORT, PROXY_TOKEN, PROXY_LOG (the
// proxy's stderr file), TLS_CERT and TLS_KEY (PEM for the https origin),
// SHOT (screenshot path, default /tmp/e2e-shot.png), CHROMIUM (default
// /usr/bin/chromium).
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { chromium } from 'playwright-core';

const env = (name, def) => {
  const v = process.env[name] ?? def;
  if (v === undefined) throw new Error(`${name} is not set`);
  return v;
};
const proxyPort = Number(env('PROXY_PORT'));
const token = env('PROXY_TOKEN');
const proxyLog = env('PROXY_LOG');
const shot = env('SHOT', '/tmp/e2e-shot.png');
const marker = randomBytes(6).toString('hex');

function fail(msg) {
  console.error(`chromium e2e: FAIL: ${msg}`);
  process.exitCode = 1;
  throw new Error(msg);
}

// page is the HTML both origins serve: it names its scheme and, on the
// http origin, opens a WebSocket to /ws and shows the echo.
function page(scheme, wsURL) {
  return `<!doctype html><html><head><meta charset="utf-8"><title>pinaka ${scheme} ${marker}</title>
<style>body{font:20px sans-serif;margin:40px;background:#f4f7fb}h1{color:#1a5fb4}#ws{color:#26a269}</style></head>
<body><h1>Hello over ${scheme} through Pinaka</h1><p id="marker">${scheme}:${marker}</p><p id="ws">websocket: pending</p>
<script>
${wsURL ? `const ws = new WebSocket(${JSON.stringify(wsURL)});
ws.onopen = () => ws.send('ping ${marker}');
ws.onmessage = (e) => { document.getElementById('ws').textContent = 'websocket: ' + e.data; ws.close(); };
ws.onerror = () => { document.getElementById('ws').textContent = 'websocket: error'; };` : `document.getElementById('ws').textContent = 'websocket: n/a';`}
</script></body></html>`;
}

// acceptWebSocket is a minimal RFC 6455 echo server for one connection:
// enough for the browser's handshake and a few small text frames.
function acceptWebSocket(req, socket) {
  const key = req.headers['sec-websocket-key'];
  if (!key) {
    socket.end('HTTP/1.1 400 Bad Request\r\n\r\n');
    return;
  }
  const accept = createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
  socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
  let buf = Buffer.alloc(0);
  socket.on('data', (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    while (buf.length >= 6) {
      const opcode = buf[0] & 0x0f;
      let len = buf[1] & 0x7f;
      let off = 2;
      if (len === 126) { len = buf.readUInt16BE(2); off = 4; }
      if (len === 127) { socket.destroy(); return; }
      if (buf.length < off + 4 + len) return;
      const mask = buf.subarray(off, off + 4);
      const payload = Buffer.from(buf.subarray(off + 4, off + 4 + len));
      for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i % 4];
      buf = buf.subarray(off + 4 + len);
      if (opcode === 0x8) { socket.end(Buffer.from([0x88, 0])); return; }
      if (opcode === 0x1) {
        const out = Buffer.from('echo: ' + payload.toString());
        socket.write(Buffer.concat([frameHeader(out.length), out]));
      }
    }
  });
  socket.on('error', () => {});
}

function frameHeader(len) {
  return len < 126 ? Buffer.from([0x81, len]) : Buffer.from([0x81, 126, len >> 8, len & 0xff]);
}

function listen(server) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server.address().port));
  });
}

// records reads the proxy's request records.
function records() {
  return readFileSync(proxyLog, 'utf8').split('\n')
    .filter((l) => l.includes('"msg":"request"'))
    .map((l) => JSON.parse(l));
}

async function waitRecords(pred, what) {
  const deadline = Date.now() + 15000;
  for (;;) {
    const found = records().filter(pred);
    if (found.length > 0) return found;
    if (Date.now() > deadline) fail(`no proxy record for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const plain = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
  res.end(page('http', `ws://127.0.0.1:${plain.address().port}/ws`));
});
plain.on('upgrade', (req, socket) => acceptWebSocket(req, socket));
const secure = https.createServer({ cert: readFileSync(env('TLS_CERT')), key: readFileSync(env('TLS_KEY')) }, (req, res) => {
  res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
  res.end(page('https'));
});
const httpPort = await listen(plain);
const httpsPort = await listen(secure);

const browser = await chromium.launch({
  executablePath: env('CHROMIUM', '/usr/bin/chromium'),
  // launch() gives Chromium a fresh temporary profile (--user-data-dir)
  // and removes it on close.
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--no-pings', '--disable-domain-reliability', '--disable-client-side-phishing-detection',
    // The proxy's and the https origin's certificates are self-signed.
    '--ignore-certificate-errors',
  ],
  // Playwright passes this as --proxy-server and, by default, adds
  // <-loopback> to the bypass list so loopback origins go through the
  // proxy too; it answers the 407 challenge with these credentials.
  proxy: { server: `https://127.0.0.1:${proxyPort}`, bypass: '<-loopback>', username: 'pinaka', password: token },
});
let ok = false;
try {
  console.log(`chromium e2e: ${browser.version()}, proxy https://127.0.0.1:${proxyPort}, origins http:${httpPort} https:${httpsPort}`);
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 900, height: 420 } });
  const tab = await context.newPage();

  const httpsURL = `https://127.0.0.1:${httpsPort}/`;
  let res = await tab.goto(httpsURL, { waitUntil: 'load' });
  if (res.status() !== 200) fail(`${httpsURL}: status ${res.status()}`);
  const httpsText = await tab.textContent('#marker');
  if (httpsText !== `https:${marker}`) fail(`${httpsURL}: page says ${JSON.stringify(httpsText)}`);
  console.log(`chromium e2e: ${httpsURL} loaded: ${await tab.title()}`);

  const httpURL = `http://127.0.0.1:${httpPort}/`;
  res = await tab.goto(httpURL, { waitUntil: 'load' });
  if (res.status() !== 200) fail(`${httpURL}: status ${res.status()}`);
  const httpText = await tab.textContent('#marker');
  if (httpText !== `http:${marker}`) fail(`${httpURL}: page says ${JSON.stringify(httpText)}`);
  await tab.waitForFunction(() => !document.getElementById('ws').textContent.includes('pending'), null, { timeout: 15000 });
  const wsText = await tab.textContent('#ws');
  if (wsText !== `websocket: echo: ping ${marker}`) fail(`websocket: page says ${JSON.stringify(wsText)}`);
  console.log(`chromium e2e: ${httpURL} loaded: ${await tab.title()}; ${wsText}`);
  await tab.screenshot({ path: shot });
  console.log(`chromium e2e: screenshot ${shot}`);
  await context.close();
  ok = true;
} finally {
  await browser.close();
  plain.close();
  secure.close();
  plain.closeAllConnections?.();
  secure.closeAllConnections?.();
}
if (!ok) process.exit(1);

// What the proxy saw. Tunnels are recorded when they end, which the
// browser's exit has just caused.
const httpsTarget = `127.0.0.1:${httpsPort}`;
const tunnels = await waitRecords((r) => r.method === 'CONNECT' && r.target_url === httpsTarget && r.status_code === 200, `CONNECT ${httpsTarget}`);
const pages = await waitRecords((r) => r.target_url === `http://127.0.0.1:${httpPort}/` && r.status_code === 200, `GET http://127.0.0.1:${httpPort}/`);
// Through a proxy Chromium tunnels ws:// with CONNECT; a forwarded
// upgrade (GET .../ws, 101) would be fine too.
const sockets = await waitRecords((r) => (r.method === 'CONNECT' && r.target_url === `127.0.0.1:${httpPort}` && r.status_code === 200) ||
  (r.target_url.endsWith(`127.0.0.1:${httpPort}/ws`) && r.status_code === 101), `the WebSocket to 127.0.0.1:${httpPort}`);
const challenges = records().filter((r) => r.status_code === 407);
const summary = (rs) => [...new Set(rs.map((r) => `${r.protocol} ${r.method} ${r.target_url} -> ${r.status_code}`))].join('; ');
console.log(`chromium e2e: https page: ${summary(tunnels)}`);
console.log(`chromium e2e: http page: ${summary(pages)}`);
console.log(`chromium e2e: websocket: ${summary(sockets)}`);
console.log(`chromium e2e: 407 challenges answered: ${challenges.length}`);
if (!tunnels.every((r) => r.protocol === 'HTTP/2')) fail(`Chromium's CONNECTs were not all HTTP/2: ${summary(tunnels)}`);
if (!pages.every((r) => r.protocol === 'HTTP/2')) fail(`Chromium's http:// request was not HTTP/2: ${summary(pages)}`);
if (challenges.length === 0) fail('no 407 challenge recorded: the credentials were not obtained the browser way');
for (const r of [...tunnels, ...pages, ...sockets]) {
  if (r.token_id !== 'e2e-chromium' || r.region !== 'us-east') fail(`record without the token's identity: ${JSON.stringify(r)}`);
}
console.log('chromium e2e: ok');
