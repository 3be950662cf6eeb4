// The hub (`nanokit hub`, JS `hub()`) in headless Chromium, against real
// processes, real lock files, a real key/value file and (one case) the real
// Docker daemon. What the page shows is read from its DOM; what the world
// is, from the processes and files themselves.
//
// NANOKIT_HUB_SCREENSHOTS=docs node --test __test__/hub.spec.mjs
// also saves the README's screenshots (docs/hub-*.png).
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { request } from 'node:http'
import { spawnSync } from 'node:child_process'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { gunzipSync } from 'node:zlib'

import { IN_CI, needsChromium, needsDocker, requireDocker } from './helpers/services.mjs'
import { answer, basicProject, hubInBrowser, launch, nk, open, project, row, screenshot, waitRows } from './helpers/hub.mjs'
import { ev, killAll, worker } from './helpers/spawn.mjs'
import { CLIS, start } from './helpers/clis.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')

const alive = (pid) => {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

/** Console problems that matter: CSP reports and script errors (not our own 4xx answers). */
const problems = (page) => page.problems().filter((p) => !/Failed to load resource/.test(p))

/** An HTTP request with any headers (fetch cannot set Host): `{ status, body }`. */
function raw(url, { method = 'GET', headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const u = new URL(url)
    const req = request({ host: '127.0.0.1', port: u.port, path: u.pathname + u.search, method, headers }, (res) => {
      const chunks = []
      res.on('data', (d) => chunks.push(d))
      res.on('end', () => {
        const bytes = Buffer.concat(chunks)
        resolve({ status: res.statusCode, headers: res.headers, body: bytes.toString(), bytes })
      })
    })
    req.on('error', reject)
    req.end(body)
  })
}

describe('hub in Chromium: the example project', needsChromium(), () => {
  let ex, hub, browser, page
  before(async () => {
    ex = await basicProject()
    await nk.up({ file: ex.file, vars: ex.vars })
    ;({ hub, browser, page } = await hubInBrowser({ file: ex.file, vars: ex.vars }))
  })
  after(async () => {
    await browser?.close()
    await hub?.close()
    await nk.down({ file: ex.file, vars: ex.vars }).catch(() => {})
  })

  test('lists the three services healthy with their pids, and the graph as layers coloured by state', async () => {
    const rows = await waitRows(page, (r) => ['db', 'api', 'worker'].every((s) => r[s]?.status === 'healthy'), { what: 'three healthy services' })
    const status = await nk.status({ file: ex.file, vars: ex.vars })
    for (const s of status) assert.equal(Number(rows[s.service].pid), s.pid, `${s.service}'s pid`)
    const graph = await page.evaluate(() =>
      [...document.querySelectorAll('.graph[data-env="local"] .layer')].map((l) => [...l.querySelectorAll('.node')].map((n) => [n.dataset.node, n.className])),
    )
    assert.deepEqual(graph.map((l) => l.map((n) => n[0])), [['db'], ['api'], ['worker']])
    assert.ok(graph.flat().every(([, c]) => c.includes('s-healthy')), JSON.stringify(graph))
    const edges = await page.evaluate(() => document.querySelectorAll('.graph[data-env="local"] svg path').length)
    assert.equal(edges, 2, 'db → api → worker')
    assert.equal(await page.evaluate(() => document.title), 'nanokit hub · basic')
    await screenshot(page, 'services')
  })

  test('a service SIGKILLed shows dead without a reload; drift names it; Restore brings it back', async () => {
    const before = await row(page, 'api')
    const pid = Number(before.pid)
    const t0 = Date.now()
    // The service: its process group (sh and node), as `docker kill` would.
    process.kill(-pid, 'SIGKILL')
    await waitRows(page, (r) => r.api?.status === 'dead', { what: 'api shown dead', timeout: 5000 })
    console.log(`# SIGKILL → page shows dead (no watcher, polling): ${Date.now() - t0} ms`)
    assert.match(await page.textContent('#down-alert'), /api \(local\) is dead/)
    await page.evaluate(() => (location.hash = '#drift'))
    await page.waitForSelector('#view-drift tr[data-service="api"]')
    const kind = await page.getAttribute('#view-drift tr[data-service="api"]', 'data-kind')
    assert.ok(['gone', 'pid_reused'].includes(kind), kind)
    await screenshot(page, 'drift')
    await page.click('#view-drift button[data-act="restore"]')
    await page.evaluate(() => (location.hash = '#services'))
    const after = await waitRows(page, (r) => r.api?.status === 'healthy' && r.api.pid !== before.pid, { what: 'api restored' })
    assert.ok(alive(Number(after.api.pid)))
    await page.evaluate(() => (location.hash = '#drift'))
    await page.waitForSelector('#view-drift .panel[data-env="local"][data-drifted="false"]')
    await page.evaluate(() => (location.hash = '#services'))
  })

  test('the restart button restarts one service: its pid changes, the others keep theirs; the run is traced as `restart`', async () => {
    const before = await waitRows(page, (r) => ['db', 'api', 'worker'].every((s) => r[s]?.status === 'healthy'), { what: 'healthy' })
    await page.click('table.services[data-env="local"] tr[data-service="api"] button[data-act="restart"]')
    const after = await waitRows(page, (r) => r.api?.status === 'healthy' && r.api.pid !== before.api.pid && !r.api.phase, { what: 'api restarted' })
    assert.equal(after.db.pid, before.db.pid, 'db keeps its pid')
    assert.equal(after.worker.pid, before.worker.pid, 'worker (which depends on api) keeps its pid')
    assert.ok(!alive(Number(before.api.pid)), 'the old api process is gone')
    assert.ok(alive(Number(after.api.pid)) && alive(Number(after.db.pid)) && alive(Number(after.worker.pid)))
    await page.evaluate(() => (location.hash = '#runs'))
    const newest = await page.waitForFunction(() => document.querySelector('table.runs tr[data-run]')?.dataset.run)
    assert.match(await newest.jsonValue(), /-restart-[0-9a-f]{8}$/, 'the newest run is the restart')
  })

  test('a run opens as its timeline: one bar per span, the critical path marked, its slowest step named', async () => {
    await page.evaluate(() => (location.hash = '#runs'))
    const name = await (await page.waitForFunction(() => document.querySelector('table.runs tr[data-run]')?.dataset.run)).jsonValue()
    await screenshot(page, 'runs')
    await page.click(`table.runs tr[data-run="${name}"] a`)
    await page.waitForSelector('#chart .bar')
    const trace = JSON.parse(readFileSync(join(ex.dir, '.nanokit', 'traces', `${name}.json`), 'utf8'))
    const dom = await page.evaluate(() => ({
      bars: [...document.querySelectorAll('#chart .bar')].map((b) => ({ id: b.dataset.spanId, critical: b.classList.contains('critical') })),
      slowest: [...document.querySelectorAll('#slowest tr[data-span-id]')].map((r) => r.children[1].textContent),
    }))
    assert.equal(dom.bars.length, trace.spans.length)
    // The slowest step, named as `nanokit timeline` names it.
    const byId = Object.fromEntries(trace.spans.map((s) => [s.span_id, s]))
    const service = (s) => s.attributes['nanokit.service'] ?? (s.parent_span_id ? service(byId[s.parent_span_id]) : null)
    const root = trace.spans.find((s) => !s.parent_span_id)
    const steps = trace.spans.filter((s) => s !== root && s.name !== 'service')
    const slow = steps.reduce((a, b) => (b.end_unix_nano - b.start_unix_nano > a.end_unix_nano - a.start_unix_nano ? b : a))
    const label = service(slow) ? `${service(slow)} › ${slow.name}` : slow.name
    assert.equal(dom.slowest[0], label)
    // The root is on the critical path, and so is api's own work (the restarted service).
    assert.ok(dom.bars.find((b) => b.id === root.span_id).critical)
    const apiSpan = trace.spans.find((s) => s.name === 'service' && s.attributes['nanokit.service'] === 'api')
    assert.ok(dom.bars.find((b) => b.id === apiSpan.span_id).critical, 'the restarted service is critical')
    await screenshot(page, 'run')
    await page.evaluate(() => (location.hash = '#services'))
  })

  test('logs: all services merged, following live, searchable; one service alone', async () => {
    await page.evaluate(() => (location.hash = '#logs'))
    await page.waitForFunction(() => new Set([...document.querySelectorAll('#log .l')].map((l) => l.dataset.service)).size === 3)
    // The worker logs a count every 300 ms: new lines arrive without a reload.
    const count = () => page.evaluate(() => Math.max(0, ...[...document.querySelectorAll('#log .l[data-service="worker"]')].map((l) => Number(l.textContent.match(/count is now (\d+)/)?.[1] ?? 0))))
    const c0 = await count()
    await page.waitForFunction((c0) => [...document.querySelectorAll('#log .l[data-service="worker"]')].some((l) => Number(l.textContent.match(/count is now (\d+)/)?.[1] ?? 0) > c0 + 1), c0)
    await screenshot(page, 'logs')
    await page.fill('#log-filter', 'listening on')
    const shown = await page.evaluate(() => [...document.querySelectorAll('#log .l')].map((l) => l.textContent))
    assert.ok(shown.length >= 2 && shown.every((t) => t.includes('listening on')), JSON.stringify(shown))
    await page.click('#log-search')
    await page.waitForSelector('#log-results .l')
    const found = await page.evaluate(() => [...document.querySelectorAll('#log-results .l')].map((l) => l.textContent))
    assert.ok(found.some((t) => /^db.*db listening on/.test(t)) && found.some((t) => /^api.*api listening on/.test(t)), JSON.stringify(found))
    await page.fill('#log-filter', '')
    await page.selectOption('#log-service', 'api')
    await page.waitForFunction(() => document.querySelectorAll('#log .l').length > 0 && [...document.querySelectorAll('#log .l')].every((l) => l.dataset.service === 'api'))
    await page.evaluate(() => (location.hash = '#services'))
  })

  test('an action refused with the CLI’s code: Up while the deploy lock is held shows ENKLOCKED naming the holder', async () => {
    const held = nk.tryAcquireLock(join(ex.dir, '.nanokit', 'state.json.lock'), { holder: 'held-by-the-hub-test' })
    try {
      await page.evaluate(() => (location.hash = '#locks'))
      await page.waitForSelector('#deploy-locks tr[data-env="local"][data-held="1"]')
      assert.match(await page.textContent('#deploy-locks tr[data-env="local"] .holder'), /held-by-the-hub-test/)
      await page.evaluate(() => (location.hash = '#services'))
      await page.click('button[data-act="up"][data-env="local"]')
      const n = await page.waitForSelector('.notice.bad')
      const text = await n.textContent()
      assert.match(text, /ENKLOCKED/)
      assert.match(text, /held-by-the-hub-test/)
    } finally {
      held.release()
    }
  })

  test('a dropped connection resumes: what changed while it was down shows after it comes back', async () => {
    // The hub's end of the page's connections is destroyed (ss -K: a real
    // drop, as a restarted proxy or a sleeping laptop makes).
    const port = new URL(hub.url).port
    const drop = () => spawnSync('ss', ['-K', 'state', 'established', `( sport = :${port} )`], { encoding: 'utf8' })
    const probe = drop()
    if (probe.status !== 0) {
      assert.ok(!IN_CI, `ss -K must work in CI: ${probe.stderr}`)
      return
    }
    await page.waitForSelector('body[data-connected="1"]')
    const before = await row(page, 'worker')
    let dropped = 0
    const until = Date.now() + 10000
    // Drop repeatedly while the worker is killed, so the change happens
    // while the page is cut off.
    while (Date.now() < until && !(await page.evaluate(() => document.body.dataset.connected === '0'))) {
      drop()
      dropped++
      await new Promise((r) => setTimeout(r, 20))
    }
    assert.equal(await page.evaluate(() => document.body.dataset.connected), '0', `the page saw the drop (${dropped} tries)`)
    process.kill(-Number(before.pid), 'SIGKILL')
    await page.waitForSelector('body[data-connected="1"]', { timeout: 10000 })
    await waitRows(page, (r) => r.worker?.status === 'dead', { what: 'worker dead after the reconnection', timeout: 5000 })
    await page.click('table.services[data-env="local"] tr[data-service="worker"] button[data-act="restart"]')
    await waitRows(page, (r) => r.worker?.status === 'healthy' && r.worker.pid !== before.pid, { what: 'worker back' })
  })

  test('Down asks first: Cancel does nothing, Confirm stops every service; a stopped service shows its last lines', async () => {
    const before = await waitRows(page, (r) => ['db', 'api', 'worker'].every((s) => r[s]?.status === 'healthy'), { what: 'healthy' })
    await page.click('button[data-act="down"][data-env="local"]')
    await answer(page, 'cancel')
    await page.waitForTimeout(700)
    const still = await waitRows(page, () => true)
    for (const s of ['db', 'api', 'worker']) {
      assert.equal(still[s].pid, before[s].pid)
      assert.ok(alive(Number(before[s].pid)), `${s} still runs after Cancel`)
    }
    await page.click('button[data-act="down"][data-env="local"]')
    await answer(page, 'ok')
    await waitRows(page, (r) => ['db', 'api', 'worker'].every((s) => r[s]?.status === 'not deployed'), { what: 'every service stopped' })
    for (const s of ['db', 'api', 'worker']) assert.ok(!alive(Number(before[s].pid)), `${s} stopped`)
    await page.evaluate(() => (location.hash = '#logs/db'))
    await page.waitForFunction(() => [...document.querySelectorAll('#log .l')].some((l) => l.textContent.includes('db listening on')))
    assert.match(await page.textContent('#log-note'), /db is not deployed: its last lines/)
  })

  test('the page made no request outside its own origin and broke no Content-Security-Policy rule', async () => {
    assert.ok(page.requests.length > 5)
    assert.deepEqual(page.foreign(), [])
    assert.deepEqual(problems(page), [])
  })
})

describe('hub in Chromium: under a real `nanokit watch`', needsChromium(), () => {
  // b's restart takes 1.5 s (its prestart hook), so "down" lasts long
  // enough to be seen, and a page that learnt of it only by chance (its
  // own 1 s poll while watched) would miss the 1 s bound.
  const yml = [
    'name: hubwatch',
    'services:',
    '  a:',
    '    start: "exec sleep 600"',
    '  b:',
    '    start: "exec sleep 600"',
    '    depends_on: [a]',
    '    hooks:',
    '      prestart: "sleep 1.5"',
    '  c:',
    '    start: "exec sleep 600"',
    '',
  ].join('\n')
  let p, watcher, hub, browser, page
  const events = () =>
    readFileSync(join(p.dir, '.nanokit', 'watch', 'events.jsonl'), 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l))
  before(async () => {
    p = project(yml)
    // A separate `nanokit watch` process (the npm CLI), as a user runs it.
    watcher = start(CLIS[0], ['watch', '-f', p.file], { stdio: ['ignore', 'ignore', 'inherit'] })
    const deadline = Date.now() + 60000
    while (!existsSync(join(p.dir, '.nanokit', 'watch', 'events.jsonl')) || !events().some((e) => e.type === 'passFinished' && e.outcome === 'ok')) {
      assert.ok(Date.now() < deadline, 'the watcher never finished its first pass')
      await new Promise((r) => setTimeout(r, 50))
    }
    ;({ hub, browser, page } = await hubInBrowser({ file: p.file }))
  })
  after(async () => {
    await browser?.close()
    await hub?.close()
    if (watcher && watcher.exitCode == null) {
      const exited = new Promise((r) => watcher.once('exit', r))
      watcher.kill('SIGTERM')
      await exited
    }
    if (p) await nk.down({ file: p.file }).catch(() => {})
  })

  test('a service SIGKILLed shows down, then restarted with restarts = 1, without a reload, each within 1 s of the watcher’s event', async () => {
    const before = await waitRows(page, (r) => ['a', 'b', 'c'].every((s) => r[s]?.status === 'healthy' && r[s].restarts === '0'), { what: 'three healthy, watched services' })
    assert.match(await page.textContent('#watch-local'), new RegExp(`watcher running · pid ${watcher.pid}`))
    // Every change of b's row, timed on the page (Date.now(): the clock of
    // the watcher's event times), as it happens: a MutationObserver.
    await page.evaluate(() => {
      window.__sameDocument = true
      window.__b = []
      const note = () => {
        const r = document.querySelector('table.services[data-env="local"] tr[data-service="b"]')
        const now = r ? { status: r.dataset.status, pid: r.dataset.pid, restarts: r.dataset.restarts } : null
        const last = window.__b.at(-1)
        if (JSON.stringify(now) !== JSON.stringify(last?.row)) window.__b.push({ t: Date.now(), row: now })
      }
      note()
      new MutationObserver(note).observe(document.getElementById('view-services'), { subtree: true, childList: true, attributes: true, characterData: true })
    })
    const pid = Number(before.b.pid)
    const tKill = Date.now()
    process.kill(pid, 'SIGKILL')
    const after = await waitRows(page, (r) => r.b?.status === 'healthy' && r.b.pid !== before.b.pid && r.b.restarts === '1', { what: 'b restarted, restarts = 1', timeout: 20000 })
    assert.equal(await page.evaluate(() => window.__sameDocument), true, 'no reload')
    assert.ok(alive(Number(after.b.pid)) && !alive(pid))
    assert.equal(after.a.pid, before.a.pid, 'a keeps its pid')
    assert.equal(after.c.pid, before.c.pid, 'c keeps its pid')
    // The watcher's own account of it.
    const evs = events()
    const exited = evs.find((e) => e.type === 'serviceExited' && e.service === 'b' && e.instance.startsWith(`${pid}@`))
    assert.ok(exited, `the watcher told of b's exit: ${JSON.stringify(evs.slice(-10))}`)
    assert.equal(exited.exit.signal, 'SIGKILL')
    const restarted = evs.find((e) => e.type === 'restarted' && e.service === 'b' && e.seq > exited.seq)
    assert.ok(restarted, 'the watcher told of b’s restart')
    const tExit = Date.parse(exited.at)
    const tRestarted = Date.parse(restarted.at)
    const seen = await page.evaluate(() => window.__b)
    const down = seen.find((x) => x.t >= tKill && x.row && x.row.status !== 'healthy')
    const up = seen.find((x) => x.t >= tKill && x.row?.status === 'healthy' && x.row.pid !== String(pid) && x.row.restarts === '1')
    const log = JSON.stringify({ tKill, tExit, tRestarted, seen: seen.map((x) => ({ ...x, t: x.t - tKill })) })
    assert.ok(down, `the page showed b down: ${log}`)
    assert.ok(up, log)
    assert.ok(down.t < up.t, log)
    console.log(`# under watch: SIGKILL → page shows b ${down.row.status}: ${down.t - tKill} ms (${down.t - tExit} ms after the watcher's serviceExited); restarted (restarts = 1): ${up.t - tRestarted} ms after its restarted event`)
    assert.ok(down.t - tExit <= 1000, `b shown down ${down.t - tExit} ms after the watcher's event (≤ 1000): ${log}`)
    assert.ok(up.t - tRestarted <= 1000, `b shown restarted ${up.t - tRestarted} ms after the watcher's event (≤ 1000): ${log}`)
    // Its row tells what happened, as Nomad's task events do.
    const text = await page.evaluate(() => Object.fromEntries([...document.querySelectorAll('tr.event[data-of="b"]')].map((r) => [r.dataset.event, r.textContent])))
    assert.match(text.serviceExited, new RegExp(`ago · ${pid}@\\d+ .*SIGKILL`), JSON.stringify(text))
    assert.match(text.restartScheduled, /restarting at once \(attempt 1\)/, JSON.stringify(text))
    assert.match(text.restarted, /restarted \(attempt \d+\)/, JSON.stringify(text))
    assert.match(await page.textContent('table.services[data-env="local"] tr[data-service="b"] .error'), /last exit: .*SIGKILL/)
    // Only b's own events are under b: not a's, not b's progress lines.
    assert.ok(!(await page.$('tr.event[data-of="b"][data-event="progress"]')))
    const mine = await page.evaluate(() => [
      concerns({ type: 'held', service: 'b' }, 'b'),
      concerns({ type: 'held', service: 'a' }, 'b'),
      concerns({ type: 'progress', service: 'b' }, 'b'),
      concerns({ type: 'dependentsReleased', service: 'a', dependents: ['b'] }, 'b'),
      concerns({ type: 'driftFound', items: [{ service: 'b', detail: 'x' }] }, 'b'),
      concerns({ type: 'request', id: '1', command: 'restart', services: ['a'] }, 'b'),
      concerns({ type: 'passStarted', pass: 1, reason: 'restart', services: ['b'] }, 'b'),
    ])
    assert.deepEqual(mine, [true, false, false, true, true, false, false])
  })

  test('the restart button while the watcher leads is handed to it: only that service’s pid changes', async () => {
    const before = await waitRows(page, (r) => ['a', 'b', 'c'].every((s) => r[s]?.status === 'healthy'), { what: 'healthy' })
    await page.click('table.services[data-env="local"] tr[data-service="a"] button[data-act="restart"]')
    const after = await waitRows(page, (r) => r.a?.status === 'healthy' && r.a.pid !== before.a.pid && !r.a.phase, { what: 'a restarted' })
    assert.equal(after.b.pid, before.b.pid, 'b (which depends on a) keeps its pid')
    assert.equal(after.c.pid, before.c.pid, 'c keeps its pid')
    assert.ok(!alive(Number(before.a.pid)) && alive(Number(after.a.pid)))
    assert.equal(await page.$('.notice.bad'), null, 'not refused (ENKLOCKED)')
    const req = events().findLast((e) => e.type === 'request')
    assert.equal(req.command, 'restart')
    assert.deepEqual(req.services, ['a'])
    assert.deepEqual(problems(page), [])
    assert.deepEqual(page.foreign(), [])
  })
})

describe('hub security', () => {
  let p, hub
  before(async () => {
    p = project('name: hubsec\nservices:\n  a:\n    start: "exec sleep 600"\n')
    await nk.up({ file: p.file })
    hub = await nk.hub({ file: p.file, port: 0, stateUrl: '', stateDir: mkdtempSync(join(tmpdir(), 'nk-hub-kv-')) })
  })
  after(async () => {
    await hub?.close()
    await nk.down({ file: p.file }).catch(() => {})
  })

  test('no token → 401; a wrong token → 401; a wrong Host → 403; the token moves to an HttpOnly SameSite cookie', async () => {
    const u = new URL(hub.url)
    const token = u.searchParams.get('token')
    assert.match(token, /^[0-9a-f]{64}$/)
    assert.equal(u.hostname, '127.0.0.1')
    const base = `${u.origin}`
    for (const path of ['/', '/api/view', '/api/events', '/assets/app.js', '/api/logs', '/nope']) {
      assert.equal((await raw(base + path)).status, 401, path)
    }
    assert.equal((await raw(`${base}/?token=${'0'.repeat(64)}`)).status, 401)
    assert.equal((await raw(`${base}/api/view`, { headers: { 'x-nanokit-token': token.slice(0, 63) + 'x' } })).status, 401)
    // DNS rebinding: a page of evil.example resolving to 127.0.0.1 sends its own name.
    for (const host of [`evil.example:${u.port}`, '127.0.0.1', `127.0.0.2:${u.port}`, `localhost.evil.example:${u.port}`, `127.0.0.1.nip.io:${u.port}`]) {
      const r = await raw(`${hub.url}`, { headers: { host } })
      assert.equal(r.status, 403, host)
    }
    const first = await raw(hub.url)
    assert.equal(first.status, 303)
    assert.equal(first.headers.location, '/')
    const cookie = first.headers['set-cookie'][0]
    assert.match(cookie, new RegExp(`^nkhub_${u.port}=${token}; Path=/; HttpOnly; SameSite=Strict$`))
    const page = await raw(`${base}/`, { headers: { cookie: cookie.split(';')[0] } })
    assert.equal(page.status, 200)
    assert.match(page.headers['content-security-policy'], /default-src 'none'/)
    assert.doesNotMatch(page.headers['content-security-policy'], /https?:|\*|unsafe/)
    assert.equal(page.headers['x-frame-options'], 'DENY')
    assert.equal(page.headers['x-content-type-options'], 'nosniff')
    assert.doesNotMatch(page.body, /https?:\/\/(?!127)/, 'the page names no other origin')
  })

  test('the scripts, styles and icon go gzipped to a client that accepts gzip, as they are to one that does not', async () => {
    const u = new URL(hub.url)
    const headers = { 'x-nanokit-token': u.searchParams.get('token') }
    for (const [name, type] of [['app.js', 'text/javascript'], ['app.css', 'text/css'], ['icon.svg', 'image/svg+xml']]) {
      const source = readFileSync(join(root, 'src', 'hub', 'assets', name))
      const plain = await raw(`${u.origin}/assets/${name}`, { headers })
      assert.equal(plain.status, 200, name)
      assert.equal(plain.headers['content-encoding'], undefined, name)
      assert.ok(plain.headers['content-type'].startsWith(type), name)
      assert.ok(plain.bytes.equals(source), `${name} as it is`)
      for (const accept of ['gzip, deflate, br, zstd', 'gzip;q=0, br', 'identity']) {
        const r = await raw(`${u.origin}/assets/${name}`, { headers: { ...headers, 'accept-encoding': accept } })
        assert.equal(r.status, 200, name)
        assert.equal(r.headers.vary, 'accept-encoding')
        assert.match(r.headers['content-security-policy'], /default-src 'none'/)
        if (accept.startsWith('gzip,')) {
          assert.equal(r.headers['content-encoding'], 'gzip', name)
          assert.ok(r.bytes.length < source.length, `${name} is smaller gzipped`)
          assert.ok(gunzipSync(r.bytes).equals(source), `${name} gunzips to its source`)
        } else {
          assert.equal(r.headers['content-encoding'], undefined, `${name} with ${accept}`)
          assert.ok(r.bytes.equals(source), `${name} with ${accept}`)
        }
      }
    }
  })

  test('a POST without the token header is refused and nothing is done (cookie alone, wrong origin, no JSON)', async () => {
    const u = new URL(hub.url)
    const token = u.searchParams.get('token')
    const cookie = `nkhub_${u.port}=${token}`
    const [before] = await nk.status({ file: p.file })
    assert.ok(before.alive)
    const down = `${u.origin}/api/actions/down`
    const body = JSON.stringify({ confirm: true })
    const json = { 'content-type': 'application/json' }
    const refusals = [
      { headers: { ...json } },
      { headers: { ...json, cookie } },
      { headers: { 'content-type': 'text/plain', cookie }, why: 'a form post' },
      { headers: { ...json, cookie, 'x-nanokit-token': 'f'.repeat(64) } },
      { headers: { ...json, 'x-nanokit-token': token, origin: 'http://evil.example' } },
      { headers: { 'content-type': 'application/x-www-form-urlencoded', 'x-nanokit-token': token } },
    ]
    for (const r of refusals) {
      const res = await raw(down, { method: 'POST', headers: r.headers, body })
      assert.ok([401, 403, 415].includes(res.status), `${JSON.stringify(r.headers)} → ${res.status}`)
    }
    // Down without confirm is refused with the CLI's ENKCONFIRM.
    const unconfirmed = await raw(down, { method: 'POST', headers: { ...json, 'x-nanokit-token': token }, body: '{}' })
    assert.equal(unconfirmed.status, 400)
    assert.equal(JSON.parse(unconfirmed.body).code, 'ENKCONFIRM')
    const [after] = await nk.status({ file: p.file })
    assert.equal(after.pid, before.pid, 'nothing was done')
    assert.ok(after.alive)
    assert.ok(alive(after.pid))
  })
})

describe('hub in Chromium: strings are text, secrets masked, environments grouped', needsChromium(), () => {
  const PAYLOAD = (n) => `<img src=x onerror=window.__pwned=${n}>`
  let p, hub, browser, page, stateDir
  before(async () => {
    p = project(
      `name: hubxss
services:
  talker:
    start: "printf '%s\\\\n' '${PAYLOAD(1)}' '<script>window.__pwned=2</script>' \\"token=$SECRET_TOKEN\\"; exec sleep 600"
    env: { SECRET_TOKEN: "\${SECRET_TOKEN}" }
  broken:
    start: "exec sleep 600"
    hooks:
      prestart: "echo '${PAYLOAD(3)}'; exit 3"
environments:
  staging: {}
`,
      { '.env': 'SECRET_TOKEN=s3cr3t-hub-value-9911\n' },
    )
    for (const env of ['local', 'staging']) await nk.up({ file: p.file, env }).catch((e) => assert.equal(e.code, 'ENKFAILED'))
    stateDir = mkdtempSync(join(tmpdir(), 'nk-hub-kv-'))
    const st = await nk.openState({ stateDir, url: '', agent: 'evil' })
    await st.set(PAYLOAD(4), '<script>window.__pwned=5</script>')
    await st.set('package:installed:nginx', { version: '1.2.3', note: PAYLOAD(7) })
    await st.lock('<b>lock</b>', PAYLOAD(6), 60)
    hub = await nk.hub({ file: p.file, port: 0, stateUrl: '', stateDir })
    browser = await launch()
    page = await open(browser, hub.url)
  })
  after(async () => {
    await browser?.close()
    await hub?.close()
    for (const env of ['local', 'staging']) await nk.down({ file: p.file, env }).catch(() => {})
  })

  test('log lines, errors, keys, values and lock holders that are HTML show as text; no script runs', async () => {
    await page.waitForSelector('details[data-env="staging"]')
    const envs = await page.evaluate(() => [...document.querySelectorAll('details[data-env]')].map((d) => d.dataset.env))
    assert.deepEqual(envs, ['local', 'staging'], 'grouped by environment')
    const broken = await (await page.waitForFunction(() => document.querySelector('table.services[data-env="local"] tr[data-service="broken"] .error')?.textContent)).jsonValue()
    assert.ok(broken.includes(PAYLOAD(3)), broken)
    await page.evaluate(() => (location.hash = '#logs/talker'))
    await page.waitForFunction(() => document.querySelectorAll('#log .l').length >= 3)
    const lines = await page.evaluate(() => [...document.querySelectorAll('#log .l')].map((l) => l.textContent))
    assert.ok(lines.some((l) => l.includes(PAYLOAD(1))), JSON.stringify(lines))
    assert.ok(lines.some((l) => l.includes('<script>window.__pwned=2</script>')))
    assert.ok(lines.some((l) => l.includes('token=***')), 'the secret is masked')
    assert.ok(!lines.join('\n').includes('s3cr3t-hub-value'), 'the secret never reaches the page')
    await page.evaluate(() => (location.hash = '#state'))
    await page.waitForSelector('.agent[data-agent="evil"] tr[data-key]')
    const st = await page.evaluate(() => ({
      keys: [...document.querySelectorAll('.agent[data-agent="evil"] tr[data-key] td:first-child')].map((t) => t.textContent),
      values: [...document.querySelectorAll('.agent[data-agent="evil"] tr[data-key] td.kv-val')].map((t) => t.textContent),
      locks: [...document.querySelectorAll('.agent[data-agent="evil"] .kv-locks tr[data-lock]')].map((r) => [r.children[0].textContent, r.children[1].textContent]),
    }))
    assert.ok(st.keys.includes(PAYLOAD(4)), JSON.stringify(st))
    assert.ok(st.values.includes('<script>window.__pwned=5</script>'))
    assert.ok(st.values.some((v) => v.includes(PAYLOAD(7))))
    assert.deepEqual(st.locks, [['<b>lock</b>', PAYLOAD(6)]])
    await screenshot(page, 'state')
    // A nanokit.yml that no longer loads is said (as text), the last good one stays shown.
    const good = readFileSync(p.file, 'utf8')
    writeFileSync(p.file, `${good}  ${PAYLOAD(8)}: [\n`)
    try {
      const said = await (await page.waitForFunction(() => document.querySelector('#config-errors .alert')?.textContent, null, { timeout: 10000 })).jsonValue()
      assert.match(said, /nanokit\.yml \(local\) does not load.*ENK[A-Z]+: /s, said)
      assert.ok(await page.$('table.services[data-env="local"] tr[data-service="talker"]'), 'the last good configuration stays shown')
    } finally {
      writeFileSync(p.file, good)
    }
    await page.waitForFunction(() => !document.querySelector('#config-errors .alert'), null, { timeout: 10000 })
    // A search for the secret finds nothing: lines are masked before matching.
    const token = new URL(hub.url).searchParams.get('token')
    const r = await fetch(`${new URL(hub.url).origin}/api/logs/search?q=s3cr3t-hub&service=talker`, { headers: { 'x-nanokit-token': token } })
    assert.deepEqual((await r.json()).matches, [])
    const r2 = await fetch(`${new URL(hub.url).origin}/api/logs/search?q=token%3D&service=talker`, { headers: { 'x-nanokit-token': token } })
    assert.deepEqual((await r2.json()).matches, [['talker', 'token=***']])
    const pwned = await page.evaluate(() => ({ pwned: window.__pwned ?? null, injected: document.querySelectorAll('img[src="x"], script:not([src])').length + [...document.querySelectorAll('b')].filter((b) => b.textContent === 'lock').length }))
    assert.deepEqual(pwned, { pwned: null, injected: 0 })
    assert.deepEqual(page.foreign(), [])
    assert.deepEqual(problems(page), [])
  })
})

describe('hub in Chromium: 4 workers installing one package into a --repo directory', needsChromium(), () => {
  let hub, browser, page, repo
  before(async () => {
    const p = project('name: hubrepo\nservices:\n  a:\n    start: "exec sleep 600"\n')
    repo = mkdtempSync(join(tmpdir(), 'nk-hub-repo-'))
    ;({ hub, browser, page } = await hubInBrowser({ file: p.file, repos: [repo] }))
  })
  after(async () => {
    killAll()
    await browser?.close()
    await hub?.close()
  })

  test('the page shows one holder and three waiters, then the package installed', async () => {
    await page.evaluate(() => (location.hash = '#locks'))
    await page.waitForSelector('.repo table.installing')
    const spec = 'nk-hub-pkg@1.0.0'
    const ws = Array.from({ length: 4 }, () => worker({ op: 'install', repo, spec, custom: { sleepMs: 4000 }, staleMs: 60000 }))
    await Promise.all(ws.map((w) => w.next(ev('start'))))
    const seen = await (
      await page.waitForFunction(
        () => {
          const rows = [...document.querySelectorAll('.repo table.installing tr[data-package]')]
          const r = rows[0]
          return rows.length === 1 && r.dataset.waiters === '3' && r.querySelector('.holder').textContent.includes('pid') ? { package: r.dataset.package, holder: r.querySelector('.holder').textContent } : null
        },
        null,
        { timeout: 20000 },
      )
    ).jsonValue()
    assert.equal(seen.package, 'nk-hub-pkg_1.0.0')
    const installing = ws.filter((w) => w.events.some((e) => e.event === 'installing'))
    assert.equal(installing.length, 1, 'one worker installs')
    assert.ok(seen.holder.includes(`pid ${installing[0].child.pid}`), seen.holder)
    await screenshot(page, 'locks')
    await page.waitForSelector(`.repo table.installed tr[data-specifier="${spec}"]`, { timeout: 30000 })
    await page.waitForFunction(() => document.querySelectorAll('.repo table.installing tr[data-package]').length === 0)
    const done = await Promise.all(ws.map((w) => w.next(ev('done'))))
    assert.deepEqual(done.map((d) => d.result.installed).sort(), [false, false, false, true])
    assert.ok(existsSync(join(repo, 'node_modules', 'nk-hub-pkg_1.0.0', 'complete.txt')))
    // The rest of `repo status` (the store, gc candidates) in units, never raw numbers.
    await page.waitForSelector('.repo .kvline[data-field="store"]')
    const lines = await page.evaluate(() => Object.fromEntries([...document.querySelectorAll('.repo .kvline')].map((l) => [l.dataset.field, l.textContent])))
    const size = String.raw`\d+(\.\d)? (B|kB|MB|GB|TB)`
    assert.match(lines.gc, /older than\s*30 days/, JSON.stringify(lines))
    assert.match(lines.gc, new RegExp(`store bytes\\s*${size}`), JSON.stringify(lines))
    assert.match(lines.store, new RegExp(`disk bytes\\s*${size}`), JSON.stringify(lines))
    assert.doesNotMatch(lines.gc + lines.store, /2592000000|Ms\b|Bytes\b/, JSON.stringify(lines))
    const formats = await page.evaluate(() => [bytes(0), bytes(999), bytes(1234), bytes(1_234_567), span(2_592_000_000), span(5_400_000), span(86_460_000)])
    assert.deepEqual(formats, ['0 B', '999 B', '1.2 kB', '1.2 MB', '30 days', '1 hour 30 minutes', '1 day'])
    assert.deepEqual(page.foreign(), [])
  })
})

describe('hub in Chromium: the Docker provider (real daemon)', { skip: needsDocker().skip || needsChromium().skip }, () => {
  let p, hub, browser, page
  before(async () => {
    requireDocker()
    const name = `hubdock${Math.random().toString(16).slice(2, 8)}`
    p = project(`name: ${name}
infra: { provider: docker }
services:
  web:
    image: nk-busybox:latest
    start: "echo hello from the container; exec sleep 600"
`)
    await nk.up({ file: p.file })
    ;({ hub, browser, page } = await hubInBrowser({ file: p.file }))
  })
  after(async () => {
    await browser?.close()
    await hub?.close()
    await nk.down({ file: p.file }).catch(() => {})
  })

  test('the container shows healthy with its id, its output in the logs, and Restart replaces it', async () => {
    const [st] = await nk.status({ file: p.file })
    const rows = await waitRows(page, (r) => r.web?.status === 'healthy', { what: 'web healthy' })
    const shown = await page.textContent('table.services tr[data-service="web"] .pid')
    assert.ok(shown.includes(st.providerId.slice(0, 12)) || shown.includes(String(st.pid)), `${shown} vs ${st.providerId}`)
    await page.evaluate(() => (location.hash = '#logs/web'))
    await page.waitForFunction(() => [...document.querySelectorAll('#log .l')].some((l) => l.textContent.includes('hello from the container')))
    await page.evaluate(() => (location.hash = '#services'))
    await page.click('table.services tr[data-service="web"] button[data-act="restart"]')
    await waitRows(page, (r) => r.web?.status === 'healthy' && r.web.instances && r.web.instances !== rows.web.instances && !r.web.phase, { what: 'web restarted' })
    const [again] = await nk.status({ file: p.file })
    assert.notEqual(again.providerId, st.providerId, 'a new container')
    assert.deepEqual(page.foreign(), [])
  })
})

for (const c of CLIS)
  test(`${c.name} CLI: nanokit hub prints its URL, serves the view, and stops on Ctrl-C`, async () => {
    const p = project('name: hubcli\nservices:\n  a:\n    start: "exec sleep 600"\n')
    const child = start(c, ['hub', '-f', p.file, '--port', '0'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NANOKIT_STATE_URL: '' } })
    let out = ''
    let err = ''
    child.stderr.on('data', (d) => (err += d))
    const url = await new Promise((resolve, reject) => {
      const look = () => {
        const m = out.match(/^(http:\/\/127\.0\.0\.1:\d+\/\?token=[0-9a-f]{64})\n/)
        if (m && /ssh -N -L \d+:127\.0\.0\.1:\d+/.test(err)) resolve(m[1])
      }
      child.stdout.on('data', (d) => {
        out += d
        look()
      })
      child.stderr.on('data', look)
      child.on('exit', (code) => reject(new Error(`exited ${code}: ${err}`)))
    })
    const u = new URL(url)
    const r = await fetch(`${u.origin}/api/view`, { headers: { 'x-nanokit-token': u.searchParams.get('token') } })
    assert.equal(r.status, 200)
    const v = await r.json()
    assert.deepEqual(v.sections.services.map((e) => [e.env, e.config.map((s) => s.name), e.rows]), [['local', ['a'], []]])
    child.kill('SIGINT')
    const code = await new Promise((resolve) => child.on('exit', (code) => resolve(code)))
    assert.equal(code, 0, err)
  })
