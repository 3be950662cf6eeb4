// The hub's browser tests: a copy of a project on free ports, a hub on a
// free port, headless Chromium (Debian's, through playwright-core) on its
// page, and what the page shows, read from its DOM.
import assert from 'node:assert/strict'
import { cpSync, mkdirSync, mkdtempSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'

import { requireChromium } from './services.mjs'

const require = createRequire(import.meta.url)
export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
export const nk = require(join(ROOT, 'nanokit.js'))

export const freePort = () =>
  new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })

/** A copy of examples/basic on free ports: `{ dir, file, vars }`. */
export async function basicProject() {
  const dir = mkdtempSync(join(tmpdir(), 'nk-hub-'))
  cpSync(join(ROOT, 'examples', 'basic'), dir, { recursive: true, filter: (p) => !p.includes('.nanokit') })
  const vars = { ...process.env, DB_PORT: String(await freePort()), API_PORT: String(await freePort()), WORKER_INTERVAL_MS: '300' }
  return { dir, file: join(dir, 'nanokit.yml'), vars }
}

/** A project of `yml` in a temp dir: `{ dir, file, vars }`. */
export function project(yml, files = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'nk-hub-'))
  const file = join(dir, 'nanokit.yml')
  writeFileSync(file, yml)
  for (const [name, text] of Object.entries(files)) {
    mkdirSync(dirname(join(dir, name)), { recursive: true })
    writeFileSync(join(dir, name), text)
  }
  return { dir, file, vars: { ...process.env } }
}

export async function launch() {
  const executablePath = requireChromium()
  const { chromium } = require('playwright-core')
  return chromium.launch({
    executablePath,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  })
}

/**
 * Opens the hub's URL in a new page and waits for the live view. Records
 * every request and console message: `page.foreign()` lists requests to
 * another origin, `page.problems()` errors and CSP reports.
 */
export async function open(browser, url, { viewport = { width: 1400, height: 900 } } = {}) {
  const page = await browser.newPage({ viewport })
  const origin = new URL(url).origin
  const requests = []
  const problems = []
  page.on('request', (r) => requests.push(r.url()))
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') problems.push(`${m.type()}: ${m.text()}`)
  })
  page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`))
  page.on('dialog', (d) => {
    problems.push(`dialog: ${d.message()}`)
    d.dismiss()
  })
  page.foreign = () => requests.filter((u) => !u.startsWith(origin + '/') && u !== origin)
  page.problems = () => problems
  page.requests = requests
  await page.goto(url)
  await page.waitForSelector('body[data-connected="1"]')
  return page
}

/** A hub on a free port (its key/value state in a temp dir) with a page open on it: `{ hub, browser, page }`. */
export async function hubInBrowser(opts) {
  const hub = await nk.hub({ port: 0, stateUrl: '', stateDir: mkdtempSync(join(tmpdir(), 'nk-hub-kv-')), ...opts })
  const browser = await launch()
  const page = await open(browser, hub.url)
  return { hub, browser, page }
}

/** The row of `service` in environment `env`: its dataset, or null. */
export function row(page, service, env = 'local') {
  return page.evaluate(
    ([service, env]) => {
      const r = document.querySelector(`table.services[data-env="${env}"] tr[data-service="${service}"]`)
      return r ? { ...r.dataset, error: r.querySelector('.error')?.textContent ?? '' } : null
    },
    [service, env],
  )
}

/** Waits until `pred(rows)` holds, rows being every service row's dataset. */
export async function waitRows(page, pred, { env = 'local', timeout = 20000, what = 'the expected rows' } = {}) {
  const deadline = Date.now() + timeout
  let last
  while (Date.now() < deadline) {
    last = await page.evaluate((env) => {
      const out = {}
      for (const r of document.querySelectorAll(`table.services[data-env="${env}"] tr[data-service]`)) out[r.dataset.service] = { ...r.dataset }
      return out
    }, env)
    if (pred(last)) return last
    await new Promise((r) => setTimeout(r, 25))
  }
  assert.fail(`timed out waiting for ${what}; rows: ${JSON.stringify(last)}`)
}

/** Saves a screenshot of the page as docs/hub-<name>.png when NANOKIT_HUB_SCREENSHOTS names a folder. */
export async function screenshot(page, name) {
  const dir = process.env.NANOKIT_HUB_SCREENSHOTS
  if (!dir) return
  await page.waitForTimeout(300)
  await page.screenshot({ path: join(dir, `hub-${name}.png`), fullPage: false })
}

/** Clicks the confirmation dialog's button (`ok` or `cancel`). */
export async function answer(page, which) {
  await page.waitForSelector('#modal:not([hidden])')
  await page.click(`#modal-${which}`)
}
