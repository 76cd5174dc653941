// The operator's fleet page, in Debian's Chromium, against a real update-server whose fleet the
// test driver (tests/integration/browser.rs) filled: boxes that committed, failed and rolled back,
// an old box with a hostile user agent, a halted rollout.
//
// Exits 0 when every step passed, 1 with the reason (and ARTIFACTS_DIR/failure.png) otherwise.

import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set; run this through cargo test (tests/integration/browser.rs)`);
  return v;
}

const FLEET_URL = env('FLEET_URL');
const ARTIFACTS = env('ARTIFACTS_DIR');
const TOKEN = env('FLEET_TOKEN');
const V_HALTED = env('V_HALTED');
const BOXES = Number(env('BOX_COUNT'));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

mkdirSync(ARTIFACTS, { recursive: true });
const t0 = Date.now();
const log = (msg) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}`);

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
    '--no-first-run', '--disable-sync', '--disable-quic'],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, deviceScaleFactor: 1 });
const page = await context.newPage();
await page.emulateMedia({ reducedMotion: 'reduce' });
const problems = [];
const origin = new URL(FLEET_URL).origin;
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('dialog', (d) => { problems.push(`a dialog opened: ${d.message()}`); d.dismiss(); });
page.on('console', (m) => {
  // The one expected failure: /fleet.json refused while the token is wrong.
  if (m.type() === 'error' && !/status of 401/.test(m.text())) problems.push(`console error: ${m.text()}`);
});
page.on('request', (r) => {
  if (!r.url().startsWith(origin + '/')) problems.push(`request to elsewhere: ${r.url()}`);
});

let shot = 0;
async function screenshot(name) {
  shot += 1;
  const file = join(ARTIFACTS, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${file}`);
}
const text = (sel) => page.locator(sel).innerText();
const rowOf = (id) => page.locator('#boxes tbody tr', { has: page.locator('strong', { hasText: id }) });

try {
  // 1. No token yet: the page asks for one, and refuses a wrong one.
  log(`opening ${FLEET_URL}`);
  await page.goto(FLEET_URL);
  await page.locator('#login').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#view').isVisible(), false);
  await page.fill('#token', 'not-the-token');
  await page.click('#login button');
  await page.waitForFunction(() => /not the fleet token/.test(document.getElementById('login-error').textContent));
  await screenshot('wrong-token');

  // 2. The token opens the view: counts, versions, the halted rollout and why.
  await page.fill('#token', TOKEN);
  await page.click('#login button');
  await page.locator('#view').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#login').isVisible(), false);
  assert.match(await text('#cards'), new RegExp(`${BOXES}\\s+boxes`));
  assert.match(await text('#cards'), /1\s+old boxes/);
  const halted = page.locator('#releases tbody tr', { has: page.locator('strong', { hasText: V_HALTED }) });
  assert.match(await halted.innerText(), /halted/);
  assert.match(await halted.innerText(), /halted automatically: \d+ of \d+ boxes/);
  assert.match(await halted.innerText(), new RegExp(`update-server rollout ${V_HALTED} --resume`));
  assert.match(await text('#versions'), /unknown/);
  await screenshot('fleet');

  // 3. Boxes: each state as reported; what boxes send is text, never markup.
  assert.match(await rowOf('pq-7').innerText(), /failed/);
  assert.match(await rowOf('pq-7').innerText(), /exit code 7/);
  assert.match(await rowOf('pq-8').innerText(), /rolled back/);
  assert.match(await rowOf('pq-1').innerText(), /committed/);
  assert.match(await rowOf('pq-bold').innerText(), /<b>not bold<\/b>/);
  const old = rowOf('old box');
  assert.match(await old.innerText(), /<img src=x onerror=alert\(1\)>/);
  assert.equal(await page.locator('#boxes img, #boxes b, #boxes script').count(), 0, 'nothing injected');

  // 4. Filters.
  await page.fill('#filter', 'pq-7');
  await page.waitForFunction(() => document.querySelectorAll('#boxes tbody tr').length === 1);
  assert.match(await text('#shown'), /^1 box$/);
  await screenshot('filtered');
  await page.fill('#filter', '');
  await page.selectOption('#state-filter', 'bad');
  await page.waitForFunction(() => document.querySelectorAll('#boxes tbody tr').length === 2);
  await page.selectOption('#state-filter', 'old');
  await page.waitForFunction(() => document.querySelectorAll('#boxes tbody tr').length === 1);
  assert.match(await text('#boxes tbody'), /Wget/);
  await screenshot('old-boxes');
  await page.selectOption('#state-filter', '');

  // 5. The token is remembered across a reload, and forgotten on request.
  await page.reload();
  await page.locator('#view').waitFor({ state: 'visible' });
  await page.click('#forget');
  await page.locator('#login').waitFor({ state: 'visible' });
  assert.equal(await page.evaluate(() => localStorage.getItem('opq-fleet-token')), null);
  await screenshot('forgotten');

  assert.deepEqual(problems, []);
  log('all steps passed');
  await browser.close();
  process.exit(0);
} catch (e) {
  console.error(`FAILED: ${e && e.stack ? e.stack : e}`);
  if (problems.length) console.error(`also seen:\n  ${problems.join('\n  ')}`);
  try { await page.screenshot({ path: join(ARTIFACTS, 'failure.png'), fullPage: true }); } catch (_) { /* the browser is gone */ }
  await browser.close().catch(() => {});
  process.exit(1);
}
