// DNS rebinding, in Debian's Chromium: a page whose name resolves to the box (here through
// --host-resolver-rules, as a rebinding DNS server would make it) sends its requests as
// same-origin, and the box must refuse them by name; the box's own page must keep working by
// IP, by host name and through localhost (an SSH tunnel). Driven by
// tests/integration/browser.rs, which owns the box and checks its config file afterwards.
//
// Exits 0 when every step passed, 1 with the reason (and a screenshot) otherwise.

import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set; run this through cargo test (tests/integration/browser.rs)`);
  return v;
}

const PORT = env('BOX_PORT');
const OWN_NAME = env('BOX_HOST_NAME');
const ARTIFACTS = env('ARTIFACTS_DIR');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
mkdirSync(ARTIFACTS, { recursive: true });

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
    '--no-first-run', '--disable-sync', '--disable-quic',
    `--host-resolver-rules=MAP evil.example 127.0.0.1, MAP ${OWN_NAME} 127.0.0.1`],
});
const page = await browser.newPage();
const log = (msg) => console.log(msg);

try {
  // 1. The rebound name: the page is not served, and requests from that origin reach nothing.
  const evil = `http://evil.example:${PORT}`;
  const resp = await page.goto(`${evil}/`);
  assert.equal(resp.status(), 421, 'the page under a foreign name');
  assert.match(await page.locator('body').innerText(), /does not answer to the name.*evil\.example/s);
  await page.screenshot({ path: join(ARTIFACTS, 'rebound-name-refused.png') });
  const attempts = await page.evaluate(async () => {
    const out = [];
    const json = { 'Content-Type': 'application/json' };
    for (const [method, path, body] of [
      ['POST', '/box_config', JSON.stringify({ box_config: { updates_ep: 'http://evil.example:18080' } })],
      ['POST', '/box_update', JSON.stringify({ force: true })],
      ['GET', '/box_config', undefined],
      ['GET', '/box_update/status', undefined],
    ]) {
      const r = await fetch(path, { method, headers: body ? json : {}, body });
      out.push({ method, path, status: r.status, text: await r.text() });
    }
    return out;
  });
  for (const a of attempts) {
    log(`from ${evil}: ${a.method} ${a.path} -> ${a.status}`);
    assert.equal(a.status, 421, `${a.method} ${a.path}: ${a.text}`);
    assert.doesNotMatch(a.text, /updates_ep/, 'nothing of the box leaks');
  }

  // 2. The box's own names: the page loads, shows the box, and saves the config.
  for (const [label, origin] of [['ip', `http://127.0.0.1:${PORT}`], ['host-name', `http://${OWN_NAME}:${PORT}`],
    ['localhost', `http://localhost:${PORT}`]]) {
    const r = await page.goto(`${origin}/`);
    assert.equal(r.status(), 200, `the page by ${label}`);
    await page.locator('#installed[data-version]').waitFor();
    await page.waitForFunction(() => /"updates_ep"/.test(document.getElementById('config').value));
    const edited = JSON.parse(await page.locator('#config').inputValue());
    edited.opened_as = label;
    await page.locator('#config').fill(JSON.stringify(edited, null, 2));
    await page.click('#config-save');
    await page.locator('#config-ok').waitFor({ state: 'visible' });
    await page.screenshot({ path: join(ARTIFACTS, `own-name-${label}.png`), fullPage: true });
    log(`${origin}: page served, config saved`);
  }
  writeFileSync(join(ARTIFACTS, 'host_check.done'), 'ok');
  await browser.close();
  process.exit(0);
} catch (e) {
  console.error(`FAILED: ${e && e.stack ? e.stack : e}`);
  try { await page.screenshot({ path: join(ARTIFACTS, 'host-check-failure.png'), fullPage: true }); } catch (_) { /* gone */ }
  await browser.close().catch(() => {});
  process.exit(1);
}
