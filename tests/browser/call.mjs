// Two Chromium pages set up a real WebRTC call through the callgate demo, then hang up.
// Usage: node call.mjs DEMO_URL SCREENSHOT.png  -> one JSON line of results on stdout.
import { chromium } from "playwright-core";

const [demo, screenshot] = process.argv.slice(2);
const FLAGS = [
  "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-quic",
  // fake camera and microphone, granted without a prompt
  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
  // media over 127.0.0.1 only: loopback candidates allowed, real IPs instead of mDNS names
  "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
];

function log(message) {
  process.stderr.write(message + "\n");
}

async function bytesReceived(page) {
  return page.evaluate(async () => {
    const pc = window.callgate.pc;
    if (!pc) return 0;
    let total = 0;
    (await pc.getStats()).forEach((report) => {
      if (report.type === "inbound-rtp") total += report.bytesReceived || 0;
    });
    return total;
  });
}

async function waitFor(page, predicate, what, ms = 30000) {
  try {
    await page.waitForFunction(predicate, null, { timeout: ms, polling: 100 });
  } catch (error) {
    const state = await page.evaluate(() => document.getElementById("status").textContent);
    throw new Error(`${what}: not reached (${state})`);
  }
}

const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: FLAGS });
const result = { connected: false };
try {
  const pages = {};
  for (const [user, callee] of [["alice", "bob"], ["bob", "alice"]]) {
    const context = await browser.newContext({ viewport: { width: 820, height: 720 } });
    const page = await context.newPage();
    page.on("console", (message) => log(`[${user}] ${message.text()}`));
    await page.goto(`${demo}?user=${user}&callee=${callee}&loopback=1`);
    await page.click("#signin-button");
    await waitFor(page, () => window.callgate.session !== null, `${user} signed in`);
    pages[user] = page;
  }
  const { alice, bob } = pages;
  await alice.click("#video-call");
  await waitFor(bob, () => !document.getElementById("incoming").hidden, "bob rings");
  await bob.click("#answer");
  for (const page of [alice, bob]) {
    await waitFor(page, () => window.callgate.pc && window.callgate.pc.connectionState === "connected", "connected");
  }
  result.connected = true;
  // Media really flows: inbound RTP bytes grow on both sides.
  const deadline = Date.now() + 20000;
  while (Date.now() < deadline) {
    result.alice_bytes = await bytesReceived(alice);
    result.bob_bytes = await bytesReceived(bob);
    if (result.alice_bytes > 20000 && result.bob_bytes > 20000) break;
    await alice.waitForTimeout(200);
  }
  result.states = {
    alice: await alice.evaluate(() => document.getElementById("call-state").textContent),
    bob: await bob.evaluate(() => document.getElementById("call-state").textContent),
  };
  if (screenshot) {
    // One picture of both pages side by side.
    const shots = [await alice.screenshot(), await bob.screenshot()].map((b) => b.toString("base64"));
    const board = await (await browser.newContext({ viewport: { width: 1660, height: 740 } })).newPage();
    await board.setContent(
      `<body style="margin:0;display:flex;gap:20px;background:#8a94a6;padding:10px">` +
        shots.map((s) => `<img style="width:820px;border-radius:6px" src="data:image/png;base64,${s}">`).join("") +
        `</body>`,
    );
    await board.screenshot({ path: screenshot });
  }
  await alice.click("#hangup");
  await waitFor(bob, () => window.callgate.call === null, "bob sees the end");
  result.bob_status = await bob.evaluate(() => document.getElementById("status").textContent);
} catch (error) {
  result.error = String(error.message || error);
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result) + "\n");
