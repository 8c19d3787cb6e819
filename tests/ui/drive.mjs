// Drives ssegate's built-in page in Debian's Chromium: subscribe, publish from the page, drop the
// connection, publish meanwhile over HTTP, resume from the last id. Usage: node drive.mjs BASE_URL
// SCREENSHOT. Exits non-zero, saying why, when the page does not show what it should.
import { chromium } from 'playwright-core';

const [base, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  await page.goto(base + '/');
  await page.fill('#topics', 'ui.demo');
  await page.click('#connect');
  await page.waitForSelector('#status.open', { timeout: 15000 });

  // Published from the page's own form, shown in its log with its id.
  await page.fill('#pub-topic', 'ui.demo');
  await page.fill('#pub-data', 'hello from the page');
  await page.click('#publish');
  await page.locator('#log td.data', { hasText: 'hello from the page' }).waitFor({ timeout: 15000 });
  const first = await page.textContent('#last');

  // Dropped; an event is published over HTTP meanwhile; resumed from the last id: it arrives.
  await page.click('#drop');
  const r = await fetch(base + '/v1/events?topic=ui.demo', { method: 'POST', body: 'while away' });
  if (r.status !== 201) throw new Error('publish over HTTP answered ' + r.status);
  const missed = (await r.json()).id;
  await page.click('#resume');
  await page.locator('#log td.data', { hasText: 'while away' }).waitFor({ timeout: 15000 });
  const resumedAfter = await page.locator('#log tr.info td.data', { hasText: 'connected after' }).first().textContent();
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ first, missed, last: await page.textContent('#last'), resumedAfter }));
} finally {
  await browser.close();
}
