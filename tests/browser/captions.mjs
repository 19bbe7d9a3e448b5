// Drives the ingest's captions page in headless Chromium with a fake
// microphone playing a WAV file, for the WebRTC tests (tests/webrtc.rs).
//
//   node captions.mjs '<json>'
//
// The JSON names the scenario and its inputs; the result is one JSON line on
// stdout. Scenarios:
//   publish: one browser publishes `wav` as `name` into `room`, stops after
//            `speak_s` seconds and reports the page's final captions.
//   room:    a viewer page watches `room` while two browsers publish `wavs`
//            as `names` (translated into `targets`, where given); reports
//            what the viewer shows.
//   kill:    one browser publishes until its first caption shows, then the
//            browser is killed (SIGKILL to its process group).
import { chromium } from "playwright-core";

const cfg = JSON.parse(process.argv[2]);
const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
];

async function launch(wav) {
  // launchServer: the test needs the browser's process to kill it. Each
  // launch gets a fresh, empty user-data-dir.
  const args = [...FLAGS];
  if (wav) args.push(`--use-file-for-fake-audio-capture=${wav}%noloop`);
  const server = await chromium.launchServer({
    executablePath: cfg.chromium || "/usr/bin/chromium",
    headless: true,
    args,
  });
  const browser = await chromium.connect(server.wsEndpoint());
  return { server, browser };
}

function pageUrl(q) {
  return cfg.base + "/?" + new URLSearchParams(q).toString();
}

async function openPublisher(browser, name, room, target) {
  const page = await browser.newPage({ viewport: { width: 900, height: 900 } });
  page.on("console", (m) => process.stderr.write(`[${name}] ${m.text()}\n`));
  await page.goto(pageUrl({ name, room, language: "en", target: target || "", key: cfg.key || "",
                           diarize: cfg.diarize ? "true" : "" }));
  await page.click("#start");
  await page.waitForFunction(
    () => /Live|Could not/.test(document.getElementById("status").textContent),
    null, { timeout: 30000 });
  const status = await page.textContent("#status");
  if (!status.startsWith("Live")) throw new Error(`${name}: ${status}`);
  return page;
}

// The captions a page shows, with their look: interim lines greyed and
// italic, finals solid.
async function shown(page) {
  return page.evaluate(() => [...document.querySelectorAll("#captions .cap")].map((el) => {
    const t = el.querySelector(".text");
    const st = getComputedStyle(t);
    return {
      participant: el.dataset.participant,
      who: el.querySelector(".who").textContent,
      final: el.classList.contains("final"),
      text: t.textContent,
      translation: el.querySelector(".tr").textContent,
      color: st.color,
      italic: st.fontStyle === "italic",
    };
  }));
}

// Waits `seconds`, noting how interim lines looked whenever one showed.
async function watch(page, seconds) {
  let interim = null;
  const until = Date.now() + seconds * 1000;
  while (Date.now() < until) {
    const caps = await shown(page);
    const i = caps.find((c) => !c.final && c.text);
    if (i && !interim) interim = i;
    await new Promise((r) => setTimeout(r, 150));
  }
  return interim;
}

async function stop(page) {
  await page.click("#stop");
  await page.waitForFunction(
    () => document.getElementById("status").textContent.startsWith("Stopped"),
    null, { timeout: 90000 });
}

async function main() {
  const out = {};
  if (cfg.scenario === "publish") {
    const { server, browser } = await launch(cfg.wav);
    try {
      const page = await openPublisher(browser, cfg.name, cfg.room);
      out.interim = await watch(page, cfg.speak_s);
      await stop(page);
      out.captions = await shown(page);
      if (cfg.screenshot) await page.screenshot({ path: cfg.screenshot, fullPage: true });
    } finally {
      await browser.close();
      await server.close();
    }
  } else if (cfg.scenario === "room") {
    const viewerSide = await launch(null);
    const a = await launch(cfg.wavs[0]);
    const b = await launch(cfg.wavs[1]);
    try {
      const viewer = await viewerSide.browser.newPage({ viewport: { width: 900, height: 900 } });
      await viewer.goto(pageUrl({ view: cfg.room, key: cfg.key || "" }));
      await viewer.waitForFunction(
        () => document.getElementById("status").textContent.startsWith("Watching"),
        null, { timeout: 30000 });
      const pages = await Promise.all([
        openPublisher(a.browser, cfg.names[0], cfg.room, (cfg.targets || [])[0]),
        openPublisher(b.browser, cfg.names[1], cfg.room, (cfg.targets || [])[1]),
      ]);
      await watch(viewer, cfg.speak_s);
      await Promise.all(pages.map(stop));
      // The viewer got the last finals before the publishers' pages did.
      await new Promise((r) => setTimeout(r, 1000));
      out.captions = await shown(viewer);
      out.publisher_captions = await Promise.all(pages.map(shown));
      if (cfg.screenshot) await viewer.screenshot({ path: cfg.screenshot, fullPage: true });
    } finally {
      for (const s of [viewerSide, a, b]) {
        await s.browser.close().catch(() => {});
        await s.server.close().catch(() => {});
      }
    }
  } else if (cfg.scenario === "kill") {
    const { server, browser } = await launch(cfg.wav);
    const page = await openPublisher(browser, cfg.name, cfg.room);
    await page.waitForSelector("#captions .cap", { timeout: 120000 });
    out.captions = await shown(page);
    const pid = server.process().pid;
    process.kill(-pid, "SIGKILL");
    out.killed_unix_ms = Date.now();
  } else {
    throw new Error("unknown scenario " + cfg.scenario);
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().then(() => process.exit(0), (e) => {
  process.stderr.write(String(e && e.stack || e) + "\n");
  process.exit(1);
});
