// The shared repo at fleet scale, with real npm against the offline fixture
// registry: the content-addressed store (one copy of each file, read-only
// hard links), retries of transient registry failures, a bound on concurrent
// installers per host, gc, and adoption of a repo npm populated.
import assert from 'node:assert/strict'
import { execFile, spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import {
  chmodSync,
  chownSync,
  lchownSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  utimesSync,
  writeFileSync,
} from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { after, afterEach, before, describe, it } from 'node:test'

import { adaptorFixtures } from './helpers/adaptors.mjs'
import { startRegistry } from './helpers/registry.mjs'
import { eventually, killStarted, processesIn, start } from './helpers/procs.mjs'

const require = createRequire(import.meta.url)
const nk = require('../nanokit.js')
const CLI = join(import.meta.dirname, '..', 'bin', 'nanokit.js')
const cli = async (...args) => (await promisify(execFile)(process.execPath, [CLI, ...args], { encoding: 'utf8' })).stdout

afterEach(killStarted)

const tmp = (prefix) => mkdtempSync(join(tmpdir(), `nk-${prefix}-`))
const isEvent = (...names) => (e) => names.includes(e.event)
const aliasOf = (spec) => spec.slice(0, spec.lastIndexOf('@')) + '_' + spec.slice(spec.lastIndexOf('@') + 1)
const keyOf = (spec) => aliasOf(spec).replace('/', '+')
const DAY = 24 * 3600 * 1000
const sha256 = (file) => createHash('sha256').update(readFileSync(file)).digest('hex')

/** Every entry under `dir` (lstat, never following links), as { path, st }. */
function walk(dir) {
  const out = []
  const visit = (d) => {
    for (const name of readdirSync(d)) {
      const path = join(d, name)
      const st = lstatSync(path)
      out.push({ path, st })
      if (st.isDirectory()) visit(path)
    }
  }
  if (existsSync(dir)) visit(dir)
  return out
}

/**
 * Checks the store's guarantees on the whole repo: every file of every
 * package is a read-only hard link to the store file named by its SHA-256
 * (the same inode); the store holds nothing else, each file once; no
 * temporary file is left anywhere. Returns the number of package files.
 */
function assertStore(repo) {
  const store = new Map()
  for (const { path, st } of walk(join(repo, '.store', 'files'))) {
    if (st.isDirectory()) continue
    assert.ok(st.isFile(), `${path} is a regular file`)
    const name = path.split('/').pop()
    store.set(name, st)
  }
  const used = new Set()
  let files = 0
  for (const { path, st } of walk(join(repo, 'node_modules'))) {
    if (!st.isFile()) continue
    files++
    const exec = (st.mode & 0o111) !== 0
    const name = sha256(path) + (exec ? '-x' : '')
    const stored = store.get(name)
    assert.ok(stored, `${path}: its content is in the store as ${name}`)
    assert.equal(st.ino, stored.ino, `${path} is a hard link to the store's copy`)
    assert.equal(st.mode & 0o777, exec ? 0o555 : 0o444, `${path} is read-only`)
    used.add(name)
  }
  assert.deepEqual([...store.keys()].filter((n) => !used.has(n)), [], 'the store holds only files packages use')
  for (const [name, st] of store) assert.ok(st.nlink >= 2, `store file ${name} is linked`)
  const temps = walk(repo).filter(({ path }) => /\.nk-link\.|\.tmp$/.test(path))
  assert.deepEqual(temps, [], 'no temporary file is left')
  return files
}

describe('repo store, retries, concurrency, gc and adoption (real npm, offline registry)', () => {
  const fx = adaptorFixtures({ scale: 0.1 })
  const SLOTS = Array.from({ length: 6 }, (_, i) => ({
    name: `nk-slot-${i}`,
    version: '1.0.0',
    scripts: { postinstall: 'node slot.js' },
    files: {
      'index.js': `module.exports = ${i}\n`,
      // Logs its start and end to a shared file: the installs it overlaps with are observed.
      'slot.js': [
        "const fs = require('fs')",
        'const log = process.env.NK_SLOT_LOG',
        "if (log) fs.appendFileSync(log, `start ${process.pid} ${Date.now()}\\n`)",
        "setTimeout(() => { if (log) fs.appendFileSync(log, `end ${process.pid} ${Date.now()}\\n`) }, 1500)",
        '',
      ].join('\n'),
    },
  }))
  const FLAKY = { name: 'nk-flaky', version: '1.0.0', files: { 'index.js': "module.exports = 'flaky'\n" }, failMetadata: [500, 500] }
  const FLAKY2 = { ...FLAKY, name: 'nk-flaky-two', failMetadata: [502, 500] }
  const DOWN = { ...FLAKY, name: 'nk-down', failMetadata: [503, 503, 503, 503] }
  const CORRUPT = { ...FLAKY, name: 'nk-corrupt', failMetadata: undefined, corruptTarball: true }
  // A tree npm hoists and nests: the date library is a dependency of a
  // dependency only (hoisted), and the wrapper needs another version of the
  // common library than the package (nested beside the wrapper).
  const WRAP = { name: 'nk-lib-wrap', version: '1.0.0', dependencies: { 'nk-lib-common': '1.1.0', 'nk-lib-date': '^1.0.0' }, files: { 'index.js': "module.exports = require('nk-lib-common').version\n" } }
  const LAYOUT = { name: 'nk-layout', version: '1.0.0', dependencies: { 'nk-lib-common': '1.0.0', 'nk-lib-wrap': '^1.0.0' }, files: { 'index.js': "module.exports = [require('nk-lib-common').version, require('nk-lib-wrap')]\n" } }
  let registry
  before(async () => {
    registry = await startRegistry({ extra: [...fx.libs, ...fx.adaptors, ...SLOTS, FLAKY, FLAKY2, DOWN, CORRUPT, WRAP, LAYOUT] })
  })
  after(async () => {
    await registry?.close()
  })
  const npmArgs = () => registry.npmArgs

  it('two packages sharing dependencies: the shared files are one inode, read-only, and both trees load with require()', { timeout: 120_000 }, async () => {
    const repo = tmp('store-share')
    for (const spec of ['@nkfix/adaptor-http@1.0.0', '@nkfix/adaptor-dhis2@1.0.0']) {
      const r = await nk.install(repo, spec, { npmArgs: npmArgs() })
      assert.equal(r.installed, true)
      assert.equal(r.attempts, 1)
    }
    const dep = (alias) => join(repo, 'node_modules', alias, 'node_modules', 'nk-lib-common', 'lib', 'f0.js')
    const a = lstatSync(dep('@nkfix/adaptor-http_1.0.0'))
    const b = lstatSync(dep('@nkfix/adaptor-dhis2_1.0.0'))
    assert.equal(a.ino, b.ino, 'the same file in both packages is one inode')
    assert.equal(a.nlink, 3, 'two packages and the store')
    assert.equal(a.mode & 0o777, 0o444)
    assert.ok(assertStore(repo) > 20)
    assert.equal(require(join(repo, 'node_modules', '@nkfix/adaptor-http_1.0.0')).name, '@nkfix/adaptor-http@1.0.0')
    assert.equal(require(join(repo, 'node_modules', '@nkfix/adaptor-dhis2_1.0.0')).name, '@nkfix/adaptor-dhis2@1.0.0')
    const status = await nk.repo.status(repo)
    assert.ok(status.store.sharingRatio > 1.5, JSON.stringify(status.store))
    assert.ok(status.store.packageBytes > status.store.diskBytes)
    assert.equal(status.store.unreferencedFiles, 0)
    const text = await cli('repo', 'status', repo)
    assert.match(text, /sharing ratio \d+\.\d\d/)

    // Reinstalled after its directory and sentinel were lost (a wipe, a crash
    // before the sentinel): every file is still in the store, so it is built
    // by links alone from the record of its tree; npm does not run.
    const spec = '@nkfix/adaptor-http@1.0.0'
    rmSync(join(repo, 'node_modules', aliasOf(spec)), { recursive: true })
    rmSync(join(repo, '.sentinels', `${keyOf(spec)}.done`))
    const hits = registry.hits('@nkfix/adaptor-http')
    const again = await nk.install(repo, spec, { npmArgs: npmArgs(), npmPath: '/nonexistent/npm' })
    assert.equal(again.installed, true)
    assert.equal(again.attempts, 0, 'no npm run')
    assert.equal(registry.hits('@nkfix/adaptor-http'), hits)
    assertStore(repo)
    assert.equal(require(join(repo, 'node_modules', aliasOf(spec), 'index.js')).name, spec)
    // A store file whose content no longer matches its name is refused, never linked.
    rmSync(join(repo, 'node_modules', aliasOf(spec)), { recursive: true })
    rmSync(join(repo, '.sentinels', `${keyOf(spec)}.done`))
    const victim = walk(join(repo, '.store', 'files')).find(({ st }) => st.isFile() && st.nlink === 2)
    chmodSync(victim.path, 0o644)
    writeFileSync(victim.path, 'tampered')
    chmodSync(victim.path, 0o444)
    await assert.rejects(nk.install(repo, spec, { npmArgs: npmArgs() }), (e) => e.code === 'ENKFOREIGN' && e.message.includes(victim.path))
    assert.equal(nk.isInstalled(repo, spec), false)
  })

  it('the direct installer: a plain tree installs without npm, giving the tree npm gives; a package with an install script goes to npm; a tarball that does not match its integrity fails at once (EINTEGRITY)', { timeout: 120_000 }, async () => {
    const spec = '@nkfix/adaptor-salesforce@1.0.0'
    // No npm on PATH: the direct installer alone installs it.
    const PATH = process.env.PATH
    const withoutNpm = async (f) => {
      process.env.PATH = '/nonexistent'
      try {
        return await f()
      } finally {
        process.env.PATH = PATH
      }
    }
    const direct = tmp('direct')
    const r = await withoutNpm(() => nk.install(direct, spec, { npmArgs: npmArgs() }))
    assert.equal(r.installed, true)
    assert.equal(r.attempts, 1)
    assert.equal(require(join(direct, 'node_modules', aliasOf(spec))).name, spec)
    assertStore(direct)
    // An npm argument it does not know leaves the install to npm: the same
    // files, the same places, the same bytes and modes.
    const viaNpm = tmp('direct-npm')
    await nk.install(viaNpm, spec, { npmArgs: [...npmArgs(), '--foreground-scripts'] })
    const tree = (repo) => {
      const root = join(repo, 'node_modules', aliasOf(spec))
      return walk(root)
        .filter(({ st }) => !st.isDirectory())
        .map(({ path, st }) => `${path.slice(root.length)} ${st.mode & 0o777} ${sha256(path)}`)
        .sort()
    }
    const got = tree(direct)
    assert.ok(got.some((l) => l.startsWith('/node_modules/nk-lib-date/')), 'dependencies hoisted into the package')
    assert.deepEqual(got, tree(viaNpm))
    // Hoisted and nested as npm does it.
    const layout = 'nk-layout@1.0.0'
    await withoutNpm(() => nk.install(direct, layout, { npmArgs: npmArgs() }))
    await nk.install(viaNpm, layout, { npmArgs: [...npmArgs(), '--foreground-scripts'] })
    assert.deepEqual(require(join(direct, 'node_modules', aliasOf(layout))), ['1.0.0', '1.1.0'])
    const layoutTree = (repo) => walk(join(repo, 'node_modules', aliasOf(layout))).map(({ path, st }) => `${path.slice(join(repo, 'node_modules').length)} ${st.mode & 0o777} ${st.isFile() ? sha256(path) : ''}`).sort()
    const laid = layoutTree(direct)
    assert.ok(laid.some((l) => l.startsWith('/nk-layout_1.0.0/node_modules/nk-lib-date/index.js ')), laid.join('\n'))
    assert.ok(laid.some((l) => l.startsWith('/nk-layout_1.0.0/node_modules/nk-lib-wrap/node_modules/nk-lib-common/index.js ')), laid.join('\n'))
    assert.deepEqual(laid, layoutTree(viaNpm))
    // An install script needs npm: with npm unable to run, it fails.
    await withoutNpm(() => assert.rejects(nk.install(tmp('direct-script'), 'nk-slot-0@1.0.0', { npmArgs: npmArgs() }), (e) => e.code === 'ENKINSTALL' && /could not run npm/.test(e.message)))
    // Bytes that do not match the registry's integrity: nothing extracted, not retried.
    const repo = tmp('direct-corrupt')
    await withoutNpm(() => assert.rejects(nk.install(repo, 'nk-corrupt@1.0.0', { npmArgs: npmArgs() }), (e) => {
      assert.equal(e.code, 'ENKINSTALL')
      assert.match(e.message, /ran 1 time\(s\).*EINTEGRITY \(permanent\)/s)
      return true
    }))
    assert.equal(nk.isInstalled(repo, 'nk-corrupt@1.0.0'), false)
    assert.deepEqual(readdirSync(join(repo, '.staging')), [])
  })

  it('8 processes install 4 packages that share dependencies: all complete, one copy of each file, no temp file left', { timeout: 300_000 }, async () => {
    const repo = tmp('store-eight')
    const specs = ['@nkfix/adaptor-http@1.0.0', '@nkfix/adaptor-http@1.1.0', '@nkfix/adaptor-salesforce@1.0.0', '@nkfix/adaptor-mail@1.0.0']
    const ws = Array.from({ length: 8 }, (_, i) => {
      const order = [...specs.slice(i % 4), ...specs.slice(0, i % 4)]
      return start('repo-worker.mjs', { op: 'install', repo, specs: order, npmArgs: npmArgs(), staleMs: 600000, timeoutMs: 240000 })
    })
    const finished = await Promise.all(ws.map((w) => w.next(isEvent('finished', 'crash'))))
    assert.deepEqual(finished.map((f) => f.event), Array(8).fill('finished'))
    const events = ws.flatMap((w) => w.events)
    assert.deepEqual(events.filter(isEvent('error')), [])
    const done = events.filter(isEvent('done'))
    assert.equal(done.length, 32)
    for (const spec of specs) {
      assert.equal(done.filter((d) => d.spec === spec && d.result.installed).length, 1, `${spec} installed exactly once`)
      assert.equal(nk.isInstalled(repo, spec), true)
      assert.match(require(join(repo, 'node_modules', aliasOf(spec))).name, /@nkfix\/adaptor-/)
    }
    assertStore(repo)
    assert.deepEqual(readdirSync(join(repo, '.staging')), [], 'no staging tree left')
  })

  it('a registry answering 500 twice then 200: installed at the third attempt; waiters keep waiting meanwhile; 404 fails at once naming E404; a registry down gives up', { timeout: 120_000 }, async () => {
    const repo = tmp('retry')
    const r = await nk.install(repo, 'nk-flaky@1.0.0', { npmArgs: npmArgs() })
    assert.equal(r.installed, true)
    assert.equal(r.attempts, 3)
    assert.equal(registry.hits('nk-flaky'), 3, 'two failures, then the success')
    assert.equal(require(join(repo, 'node_modules', 'nk-flaky_1.0.0')), 'flaky')

    // Two processes at once: one installs through the failures, holding the
    // package lock; the other waits for it rather than retrying itself.
    const ws = [0, 1].map(() => start('repo-worker.mjs', { op: 'install', repo, specs: ['nk-flaky-two@1.0.0'], npmArgs: npmArgs(), staleMs: 600000, timeoutMs: 60000 }))
    const results = (await Promise.all(ws.map((w) => w.next(isEvent('done', 'error')))))
    assert.deepEqual(results.map((d) => d.event), ['done', 'done'], JSON.stringify(results))
    assert.deepEqual(results.map((d) => d.result.attempts).sort(), [0, 3])
    assert.equal(registry.hits('nk-flaky-two'), 3)

    const t0 = Date.now()
    await assert.rejects(nk.install(repo, 'nk-absent@1.0.0', { npmArgs: npmArgs() }), (e) => {
      assert.equal(e.code, 'ENKINSTALL')
      assert.match(e.message, /ran 1 time\(s\)/)
      assert.match(e.message, /E404 \(permanent\)/)
      assert.match(e.message, /not retried/)
      return true
    })
    assert.equal(registry.hits('nk-absent'), 1, 'a 404 is not retried')
    assert.ok(Date.now() - t0 < 15000, 'and fails at once')
    assert.equal(nk.isInstalled(repo, 'nk-absent@1.0.0'), false)

    await assert.rejects(nk.install(repo, 'nk-down@1.0.0', { npmArgs: npmArgs(), retries: 2, retryDelayMs: 100 }), (e) => {
      assert.equal(e.code, 'ENKINSTALL')
      assert.match(e.message, /ran 2 time\(s\).*attempt 1: E503 \(transient\), attempt 2: E503 \(transient\).*giving up/s)
      return true
    })
    assert.equal(registry.hits('nk-down'), 2)
    assert.deepEqual(readdirSync(join(repo, '.staging')), [])
  })

  it('6 processes, 6 packages, maxConcurrentInstalls 2: never more than 2 installers at once (observed), all complete', { timeout: 300_000 }, async () => {
    const repo = tmp('slots')
    const log = join(tmp('slots-log'), 'log')
    const ws = SLOTS.map((s) =>
      start('repo-worker.mjs', { op: 'install', repo, specs: [`${s.name}@${s.version}`], npmArgs: npmArgs(), staleMs: 600000, timeoutMs: 240000, options: { maxConcurrentInstalls: 2 } }, { env: { NK_SLOT_LOG: log } }),
    )
    // Watch the staging trees with a process in them, at every instant we can.
    let most = 0
    let watching = true
    const watch = (async () => {
      while (watching) {
        const trees = new Set(processesIn(join(repo, '.staging')).map((p) => p.cwd.split('/.staging/')[1]?.split('/')[0]).filter(Boolean))
        most = Math.max(most, trees.size)
        await new Promise((r) => setTimeout(r, 5))
      }
    })()
    const done = await Promise.all(ws.map((w) => w.next(isEvent('done', 'error'))))
    watching = false
    await watch
    assert.deepEqual(done.map((d) => d.event), Array(6).fill('done'), JSON.stringify(done))
    for (const s of SLOTS) assert.equal(nk.isInstalled(repo, `${s.name}@${s.version}`), true)
    // The install scripts' own log: the most that ran at once.
    const events = readFileSync(log, 'utf8').trim().split('\n').map((l) => l.split(' ')).map(([what, , t]) => [Number(t), what === 'start' ? 1 : -1])
    events.sort((x, y) => x[0] - y[0] || x[1] - y[1])
    let running = 0
    let peak = 0
    for (const [, d] of events) peak = Math.max(peak, (running += d))
    assert.equal(events.length, 12)
    assert.ok(peak <= 2, `install scripts running at once: ${peak}`)
    assert.ok(most <= 2, `installers at once in .staging: ${most}`)
    assert.ok(Math.max(peak, most) === 2, `two installers did run at once (scripts ${peak}, trees ${most})`)
  })

  it('gc removes an unused version and an orphaned staging tree, keeps a version in use and one being installed; what it removed reads as not installed, then installs again', { timeout: 300_000 }, async () => {
    const repo = tmp('gc')
    const [old, used] = ['@nkfix/adaptor-http@1.0.0', '@nkfix/adaptor-http@1.1.0']
    for (const spec of [old, used]) await nk.install(repo, spec, { npmArgs: npmArgs() })
    // Both last used 40 days ago.
    const long = new Date(Date.now() - 40 * DAY)
    for (const spec of [old, used]) utimesSync(join(repo, '.used', keyOf(spec)), long, long)
    // An install killed at its publish: an orphaned staging tree, and a package without a sentinel.
    const orphan = start('repo-worker.mjs', { op: 'install', repo, specs: ['nk-gc-orphan@1.0.0'], files: 3, staleMs: 600000, timeoutMs: 60000 }, { env: { NANOKIT_TEST_PAUSE_AT: 'publish' } })
    await orphan.line(/^NANOKIT_TEST_PAUSED publish /)
    await orphan.kill()
    const [orphanTree] = readdirSync(join(repo, '.staging'))
    // A worker uses the newer version now.
    const handlers = nk.createLockedHandlers(repo, { npmArgs: npmArgs() })
    assert.equal(await handlers.handleIsInstalled(used), true)

    const status = await nk.repo.status(repo)
    assert.deepEqual(status.gc.unused, [old])
    assert.deepEqual(status.gc.orphanedStaging, [join(repo, '.staging', orphanTree)])
    assert.deepEqual(status.leftovers, [join(repo, 'node_modules', 'nk-gc-orphan_1.0.0')], 'the unfinished package, once; its staging tree is in `staging`')
    assert.ok(Date.now() - status.installed.find((p) => p.specifier === used).lastUsedMs < 60000)

    // (Not isInstalled(old) until gc ran: asking from JS is a use.)
    const sentinel = join(repo, '.sentinels', `${keyOf(old)}.done`)
    const dry = await nk.repo.gc(repo, { olderThanMs: 30 * DAY, dryRun: true })
    assert.deepEqual(dry.removed, [old])
    assert.equal(dry.staging.length, 1)
    assert.ok(existsSync(sentinel) && existsSync(join(repo, 'node_modules', aliasOf(old))), 'a dry run removes nothing')
    assert.ok(existsSync(join(repo, '.staging', orphanTree)))
    // The CLI asks before removing versions; without a terminal it refuses.
    const refused = spawnSync(process.execPath, [CLI, 'repo', 'gc', repo, '--older-than', '30d'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
    assert.equal(refused.status, 1, refused.stdout + refused.stderr)
    assert.match(refused.stderr, /ENKCONFIRM.*--yes/s)
    assert.ok(existsSync(sentinel))

    // A version whose lock is held (being installed, or loaded under gc's eye) is kept.
    const held = nk.tryAcquireLock(join(repo, '.locks', `${keyOf(old)}.lock`), { holder: 'test' })
    const kept = await nk.repo.gc(repo, { olderThanMs: 30 * DAY })
    assert.deepEqual(kept.removed, [])
    assert.deepEqual(kept.kept.map((k) => k.specifier), [old])
    assert.match(kept.kept[0].reason, /lock is held/)
    assert.ok(existsSync(sentinel))
    assert.deepEqual(kept.staging, [join(repo, '.staging', orphanTree)], 'the orphaned staging tree is removed')
    assert.equal(existsSync(join(repo, '.staging', orphanTree)), false)
    held.release()

    const watcher = start('repo-watch.mjs', { repo, probe: false, packages: [old, used].map((spec) => ({ spec, alias: aliasOf(spec), files: ['package.json', 'index.js', 'lib/f0.js'] })) })
    const report = JSON.parse(await cli('repo', 'gc', repo, '--older-than', '30d', '--yes', '-o', 'json'))
    assert.deepEqual(report.removed, [old])
    assert.deepEqual(report.staging, [])
    assert.ok(report.store.files >= 3, `files only the removed version had: ${JSON.stringify(report.store)}`)
    watcher.send('stop')
    const watched = await watcher.next((e) => 'passes' in e)
    assert.deepEqual(watched.violations, [], 'never installed-but-incomplete while gc ran')

    assert.equal(await handlers.handleIsInstalled(old), false, 'what gc removed reads as not installed')
    assert.equal(existsSync(join(repo, 'node_modules', aliasOf(old))), false)
    const deps = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8')).dependencies
    assert.deepEqual(Object.keys(deps), [aliasOf(used)])
    assert.equal(await handlers.handleIsInstalled(used), true, 'the version in use is kept')
    assert.deepEqual(readdirSync(join(repo, '.staging')), [])
    assertStore(repo)
    assert.equal((await nk.repo.status(repo)).store.unreferencedFiles, 0)

    await handlers.handleInstall(old, repo)
    assert.equal(await handlers.handleIsInstalled(old), true, 'and installs again')
    assert.equal(require(join(repo, 'node_modules', aliasOf(old))).name, old)
    assertStore(repo)
  })

  it('a job (not root) writing into its adaptor\'s files gets EACCES; the store is unchanged', { timeout: 120_000 }, async () => {
    // CI runs as root, which may write anything: the installer and the job
    // both run as an unprivileged user here.
    const root = process.getuid() === 0
    const uid = root ? 65534 : process.getuid()
    const gid = root ? 65534 : process.getgid()
    const own = (dir) => (root ? chownSync(dir, uid, gid) : undefined)
    const repo = tmp('eacces')
    const home = tmp('eacces-home')
    const cache = tmp('eacces-cache')
    for (const d of [repo, home, cache]) own(d)
    const args = [...npmArgs().filter((a) => !a.startsWith('--cache=')), `--cache=${cache}`]
    const spec = '@nkfix/adaptor-postgres@1.0.0'
    // The installer runs as that user too, when it can load nanokit from
    // this checkout; otherwise (a checkout it cannot read) root installs and
    // the repo is handed to the user: the job then owns its files, and only
    // their mode can stop it.
    const canLoad = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(join(import.meta.dirname, '..', 'nanokit.js'))})`], { uid, gid }).status === 0
    const w = start('repo-worker.mjs', { op: 'install', repo, specs: [spec], npmArgs: args, staleMs: 600000, timeoutMs: 60000 }, canLoad ? { uid, gid, env: { HOME: home } } : {})
    const done = await w.next(isEvent('done', 'error'))
    assert.equal(done.event, 'done', JSON.stringify(done))
    if (!canLoad) for (const { path } of [{ path: repo }, ...walk(repo)]) lchownSync(path, uid, gid)
    const storeFiles = walk(join(repo, '.store')).filter(({ st }) => st.isFile()).map(({ path }) => path)
    const before = storeFiles.map((f) => `${f} ${sha256(f)} ${lstatSync(f).mode}`)
    const pkg = join(repo, 'node_modules', aliasOf(spec))
    const job = `
      const fs = require('fs')
      const out = []
      for (const [what, f] of [
        ['write', () => fs.writeFileSync(${JSON.stringify(join(pkg, 'index.js'))}, 'hacked')],
        ['append', () => fs.appendFileSync(${JSON.stringify(join(pkg, 'node_modules', 'nk-lib-common', 'index.js'))}, 'hacked')],
        ['open r+', () => fs.closeSync(fs.openSync(${JSON.stringify(join(pkg, 'package.json'))}, 'r+'))],
      ]) { try { f(); out.push(what + ' ok') } catch (e) { out.push(what + ' ' + e.code) } }
      console.log(out.join(', '))`
    const r = spawnSync(process.execPath, ['-e', job], { encoding: 'utf8', uid, gid })
    assert.equal(r.stdout.trim(), 'write EACCES, append EACCES, open r+ EACCES', r.stderr)
    assert.deepEqual(storeFiles.map((f) => `${f} ${sha256(f)} ${lstatSync(f).mode}`), before, 'the store is unchanged')
    assert.equal(require(pkg).name, spec)
  })

  it('a repo made by plain npm install of aliases is adopted without running npm; one made by the PR #1416 lock too; what does not verify is skipped', { timeout: 120_000 }, async () => {
    const plain = tmp('adopt')
    writeFileSync(join(plain, 'package.json'), JSON.stringify({ name: 'openfn-repo', private: true }))
    const aliases = ['@nkfix/adaptor-http@1.0.0', 'nk-fixture-a@1.0.0', '@nkfix/scoped@2.0.0']
    // What OpenFn's runtime does: npm install <alias>@npm:<name>@<version> in the repo root.
    // (Asynchronously: the registry is served from this process.)
    const npmInstall = (dir, specs) =>
      promisify(execFile)('npm', ['install', '--no-audit', '--no-fund', ...specs.map((s) => `${aliasOf(s)}@npm:${s}`), ...npmArgs()], { cwd: dir })
    await npmInstall(plain, aliases)
    // One of them lost its entry point (a partial copy).
    rmSync(join(plain, 'node_modules', '@nkfix', 'scoped_2.0.0', 'index.js'))
    assert.equal(nk.isInstalled(plain, aliases[0]), false)
    const fakeNpm = join(tmp('fake-npm'), 'npm')
    const marker = `${fakeNpm}.ran`
    writeFileSync(fakeNpm, `#!/bin/sh\ntouch ${marker}\nexit 1\n`, { mode: 0o755 })

    const report = await nk.repo.adopt(plain)
    assert.deepEqual(report.adopted.sort(), aliases.slice(0, 2).sort())
    assert.deepEqual(report.skipped.map((s) => s.alias), [aliasOf(aliases[2])])
    assert.match(report.skipped[0].reason, /entry point index\.js is missing/)
    const handlers = nk.createLockedHandlers(plain, { npmPath: fakeNpm })
    for (const spec of aliases.slice(0, 2)) {
      assert.equal(await handlers.handleIsInstalled(spec), true, `${spec} reports installed`)
      await handlers.handleInstall(spec, plain)
    }
    assert.equal(existsSync(marker), false, 'npm never ran')
    assert.equal(require(join(plain, 'node_modules', aliasOf(aliases[0]))).name, aliases[0])
    assert.equal(require(join(plain, 'node_modules', aliasOf(aliases[1]))), 'a:dep@1.0.0')
    const f = lstatSync(join(plain, 'node_modules', aliasOf(aliases[0]), 'index.js'))
    assert.equal(f.nlink, 2, 'moved into the store')
    assert.equal(f.mode & 0o777, 0o444)
    const again = JSON.parse(await cli('repo', 'adopt', plain, '-o', 'json'))
    assert.deepEqual(again.adopted, [])
    assert.deepEqual(again.already.sort(), aliases.slice(0, 2).sort())

    // PR #1416: its sentinels are .sentinels/@scope/<alias>.done, written after each install.
    const pr = tmp('adopt-1416')
    writeFileSync(join(pr, 'package.json'), JSON.stringify({ name: 'openfn-repo', private: true }))
    await npmInstall(pr, aliases.slice(0, 2))
    mkdirSync(join(pr, '.sentinels', '@nkfix'), { recursive: true })
    writeFileSync(join(pr, '.sentinels', '@nkfix', 'adaptor-http_1.0.0.done'), '')
    const r2 = await nk.repo.adopt(pr)
    assert.deepEqual(r2.adopted, [aliases[0]])
    assert.deepEqual(r2.skipped.map((s) => s.alias), [aliasOf(aliases[1])])
    assert.match(r2.skipped[0].reason, /PR #1416/)
    assert.equal(nk.isInstalled(pr, aliases[0]), true)
    assert.equal(nk.isInstalled(pr, aliases[1]), false)
  })

  it('where hard links are impossible (.store on another file system) packages keep read-only copies, said once', { timeout: 120_000 }, async (t) => {
    const probe = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', 'mount -t tmpfs none /mnt && umount /mnt'], { encoding: 'utf8' })
    if (probe.status !== 0) {
      if (process.env.CI) assert.fail(`cannot mount a tmpfs in a mount namespace (needs root): ${probe.stderr}`)
      return t.skip(`SKIPPED: needs root to mount a tmpfs (${probe.stderr.trim()})`)
    }
    const repo = tmp('exdev')
    mkdirSync(join(repo, '.store'))
    const specs = ['@nkfix/adaptor-postgres@1.0.0', '@nkfix/adaptor-mail@1.0.0']
    const w = start('repo-worker.mjs', { op: 'install', repo, specs, npmArgs: npmArgs(), staleMs: 600000, timeoutMs: 60000 }, {
      wrap: ['unshare', '-m', '--propagation', 'private', 'sh', '-c', 'mount -t tmpfs nk-store "$0/.store" && exec "$@"', repo],
    })
    const finished = await w.next(isEvent('finished', 'crash'))
    assert.equal(finished.event, 'finished')
    assert.deepEqual(w.events.filter(isEvent('error')), [])
    await w.exited
    for (const spec of specs) {
      assert.equal(nk.isInstalled(repo, spec), true)
      assert.equal(require(join(repo, 'node_modules', aliasOf(spec))).name, spec)
      const files = walk(join(repo, 'node_modules', aliasOf(spec))).filter(({ st }) => st.isFile())
      assert.ok(files.every(({ st }) => st.nlink === 1 && (st.mode & 0o222) === 0), 'own read-only copies')
    }
    const said = w.stderr.filter((l) => /cannot hard-link files into the package store/.test(l))
    assert.equal(said.length, 1, `said once: ${w.stderr.join('\n')}`)
  })
})
