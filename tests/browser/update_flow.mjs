// The box owner's update, in Debian's Chromium on a phone-sized screen, against a real update
// server and a sandboxed `box-updater serve`. Driven by tests/integration/browser.rs, which owns
// the processes; the two talk through files in CONTROL_DIR while the daemon is restarted.
//
// Exits 0 when every step passed, 1 with the reason (and artifacts/browser/failure.png) otherwise.

import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';
import { existsSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set; run this through cargo test (tests/integration/browser.rs)`);
  return v;
}

const BOX_URL = env('BOX_URL');
const ARTIFACTS = env('ARTIFACTS_DIR');
const CONTROL = env('CONTROL_DIR');
const TOKEN = env('BOX_TOKEN');
const V_OLD = env('V_OLD');
const V_NEW = env('V_NEW');
const V_FAIL = env('V_FAIL');
const TAMPERED = env('TAMPERED_IMAGE');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const STEPS = ['checking', 'downloading', 'verifying', 'unpacking', 'installing', 'switching', 'rebooting'];

mkdirSync(ARTIFACTS, { recursive: true });
const t0 = Date.now();
const log = (msg) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}`);

async function waitForFile(name, ms) {
  const deadline = Date.now() + ms;
  while (!existsSync(join(CONTROL, name))) {
    if (Date.now() > deadline) throw new Error(`the test driver never wrote ${name}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function signal(name) {
  writeFileSync(join(CONTROL, name), String(Date.now()));
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
    '--no-first-run', '--disable-sync', '--disable-quic'],
});
const context = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 1, isMobile: true, hasTouch: true });
const page = await context.newPage();
// Screenshots show each state as it is, not halfway through a CSS transition.
await page.emulateMedia({ reducedMotion: 'reduce' });
const problems = [];
const origin = new URL(BOX_URL).origin;
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('console', (m) => {
  // A fetch to the box while it is down is expected; anything else (CSP, script errors) is not.
  if (m.type() === 'error' && !/Failed to load resource|ERR_CONNECTION_REFUSED|ERR_EMPTY_RESPONSE/.test(m.text())) {
    problems.push(`console error: ${m.text()}`);
  }
});
page.on('request', (r) => {
  const u = r.url();
  if (!u.startsWith(origin + '/') && !u.startsWith('data:')) problems.push(`request to elsewhere: ${u}`);
});

let shot = 0;
async function screenshot(name) {
  shot += 1;
  const file = join(ARTIFACTS, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${file}`);
}

const text = (sel) => page.locator(sel).innerText();

try {
  // 1. The box has a token: the page asks for it, refuses a wrong one, then unlocks.
  log(`opening ${BOX_URL}`);
  await page.goto(BOX_URL);
  await page.locator('#token-card').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#update-btn').isVisible(), false, 'nothing else shows before the token');
  await screenshot('token-asked');
  await page.fill('#token-input', 'not-the-token');
  await page.click('#token-form button[type=submit]');
  await page.locator('#token-error').waitFor({ state: 'visible' });
  assert.match(await text('#token-error'), /not accepted/);
  await page.fill('#token-input', TOKEN);
  await page.click('#token-form button[type=submit]');
  await page.locator('#token-card').waitFor({ state: 'hidden' });
  assert.equal(await page.evaluate(() => localStorage.getItem('opq-box-updater-token')), TOKEN);

  // 2. Installed and newest versions, and "update available".
  await page.locator(`#installed[data-version="${V_OLD}"]`).waitFor();
  await page.locator(`#newest[data-version="${V_NEW}"]`).waitFor();
  await page.locator('#check[data-check="available"]').waitFor();
  assert.equal(await text('#check'), 'Update available');
  assert.equal(await page.locator('#update-btn').isEnabled(), true);
  await screenshot('update-available');

  // 3. Update Box: record every step the page shows, with the progress it shows.
  await page.evaluate(() => {
    window.__seen = [];
    const step = document.getElementById('step');
    const record = () => window.__seen.push({
      state: step.dataset.state,
      detail: document.getElementById('progress-detail').textContent,
      bar: Number(document.getElementById('bar').getAttribute('aria-valuenow')),
      disabled: document.getElementById('update-btn').disabled,
    });
    new MutationObserver(record).observe(document.getElementById('progress-card'), { subtree: true, childList: true, characterData: true, attributes: true });
  });
  log('clicking Update Box');
  await page.click('#update-btn');
  // Screenshots as the steps go by; whether each step was shown is asserted from the record below,
  // so a slow machine that polls past one fails with the list of steps it did show.
  const reached = (step) => page.waitForFunction((i) => {
    const steps = ['checking', 'downloading', 'verifying', 'unpacking', 'installing', 'switching', 'rebooting'];
    return steps.indexOf(document.getElementById('step').dataset.state) >= i;
  }, STEPS.indexOf(step), { timeout: 20000 });
  await reached('downloading');
  await screenshot(await page.locator('#step').getAttribute('data-state'));
  await reached('installing');
  await screenshot(await page.locator('#step').getAttribute('data-state'));
  await reached('rebooting');
  await page.locator('#banner[data-kind="info"]').waitFor();
  assert.match(await text('#banner'), new RegExp(`${V_NEW} is installed.*rebooting`, 's'));
  await screenshot('rebooting');

  const seen = await page.evaluate(() => window.__seen);
  const states = [];
  for (const s of seen) if (states[states.length - 1] !== s.state) states.push(s.state);
  log(`steps shown: ${states.join(' → ')}`);
  const steps = states.filter((s) => STEPS.includes(s));
  assert.ok(new Set(steps).size >= 2, `at least two distinct steps: ${states}`);
  assert.equal(states[states.length - 1], 'rebooting');
  for (let i = 1; i < steps.length; i++) {
    assert.ok(STEPS.indexOf(steps[i]) > STEPS.indexOf(steps[i - 1]), `steps in order: ${steps}`);
  }
  const downloads = seen.filter((s) => s.state === 'downloading' && /of .*· \d+%/.test(s.detail));
  assert.ok(downloads.length > 0, `bytes and percent while downloading: ${JSON.stringify(seen.filter((s) => s.state === 'downloading'))}`);
  const bars = seen.filter((s) => STEPS.includes(s.state)).map((s) => s.bar);
  for (let i = 1; i < bars.length; i++) assert.ok(bars[i] >= bars[i - 1], `the bar never goes back: ${bars}`);
  assert.ok(bars.some((b) => b > 0 && b < 100), `the bar moves between its ends: ${bars}`);
  assert.ok(seen.filter((s) => STEPS.includes(s.state)).every((s) => s.disabled),
    'Update Box is disabled while the update runs and until the reboot');

  // 4. The box "reboots": the driver stops the daemon and starts it again.
  signal('rebooting');
  await waitForFile('down', 20000);
  await page.locator('#banner[data-kind="down"]').waitFor({ timeout: 10000 });
  assert.match(await text('#banner'), /restarting/);
  await screenshot('box-restarting');
  signal('seen-down');

  // 5. Back up: the new version is confirmed, and the server already offers a newer one.
  await page.locator(`#installed[data-version="${V_NEW}"]`).waitFor({ timeout: 30000 });
  await page.locator('#step[data-state="committed"]').waitFor({ timeout: 10000 });
  await page.locator('#last-result[data-result="committed"]').waitFor();
  await page.locator(`#newest[data-version="${V_FAIL}"]`).waitFor({ timeout: 10000 });
  assert.equal(await page.locator('#banner').isVisible(), false);
  await screenshot('new-version');

  // 6. A failing update: its reason is on the page; the box keeps its version.
  log('clicking Update Box for the failing image');
  await page.click('#update-btn');
  await page.locator('#step[data-state="failed"]').waitFor({ timeout: 20000 });
  await page.locator('#last-result[data-result="failed"]').waitFor();
  const reason = await text('#last-reason');
  assert.match(reason, /install_update\.sh failed with exit code 7/);
  assert.match(reason, new RegExp(`keeps running version ${V_NEW}`));
  assert.match(await text('#history'), /Failed/);
  assert.match(await text('#log'), /broken on purpose/);
  assert.equal(await page.locator('#installed').getAttribute('data-version'), V_NEW);
  assert.equal(await page.locator('#update-btn').isEnabled(), true);
  await screenshot('update-failed');

  // 7. Import of a tampered image file: refused with its reason.
  await page.setInputFiles('#import-file', TAMPERED);
  await page.click('#import-btn');
  await page.waitForFunction(() => /Uploaded/.test(document.getElementById('import-status').textContent), null, { timeout: 20000 });
  await page.waitForFunction(() => /SHA256SUMS/.test(document.getElementById('last-reason')?.textContent || ''), null, { timeout: 20000 });
  await page.locator('#step[data-state="failed"]').waitFor();
  assert.equal(await page.locator('#installed').getAttribute('data-version'), V_NEW);
  assert.equal(await page.locator('#steps li.failed').innerText(), 'Unpacking');
  assert.equal(await page.locator('#steps li.skipped').count(), 2, 'an import has no check or download');
  await screenshot('import-refused');

  // 8. The config editor: errors appear under the text the user typed, and are never HTML.
  const textarea = page.locator('#config');
  const original = await textarea.inputValue();
  assert.match(original, /"updates_ep"/);
  await textarea.fill('{\n  "updates_ep": "http://x.example",\n  oops\n}');
  await page.click('#config-save');
  await page.locator('#config-error').waitFor({ state: 'visible' });
  assert.match(await text('#config-error'), /Not valid JSON.*line 3/s);
  assert.equal(await textarea.getAttribute('aria-invalid'), 'true');
  await screenshot('config-invalid-json');

  await textarea.fill('{"updates_ep": "ftp://<b>evil</b>"}');
  await page.click('#config-save');
  await page.waitForFunction(() => /refused/.test(document.getElementById('config-error').textContent));
  assert.match(await text('#config-error'), /ftp:\/\/<b>evil<\/b>/);
  assert.equal(await page.locator('#config-error b').count(), 0, 'the server message is shown as text');
  await screenshot('config-refused');

  const edited = JSON.parse(original);
  edited.note = '<i>kept as text</i>';
  await textarea.fill(JSON.stringify(edited, null, 2));
  await page.click('#config-save');
  await page.locator('#config-ok').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#config-error').isVisible(), false);
  assert.match(await textarea.inputValue(), /kept as text/);
  await screenshot('config-saved');

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
