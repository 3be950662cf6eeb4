// An installer killed mid-install, with a real npm child against the offline
// fixture registry: npm dies with its owner, a still-running orphan (an
// install script npm started) is killed by the next installer of any
// package, leftovers never fail an install, and no staging tree is left.
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, readdirSync, symlinkSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { basename, dirname, join } from 'node:path'
import { promisify } from 'node:util'
import { after, afterEach, before, describe, it } from 'node:test'

import { startRegistry } from './helpers/registry.mjs'
import { eventually, killStarted, processesIn, start } from './helpers/procs.mjs'

const require = createRequire(import.meta.url)
const nk = require('../nanokit.js')
const CLI = join(import.meta.dirname, '..', 'bin', 'nanokit.js')
const cli = async (...args) => (await promisify(execFile)(process.execPath, [CLI, ...args], { encoding: 'utf8' })).stdout

afterEach(killStarted)

const tmp = (prefix) => mkdtempSync(join(tmpdir(), `nk-${prefix}-`))
const isEvent = (...names) => (e) => names.includes(e.event)
const staging = (repo) => (existsSync(join(repo, '.staging')) ? readdirSync(join(repo, '.staging')) : [])
const deps = (repo) => (existsSync(join(repo, 'package.json')) ? JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8')).dependencies || {} : {})

// Its install script, when NK_HOLD_DIR is set, says so and then keeps writing
// files into its package directory (inside the staging tree) forever: an
// orphan that outlives npm unless something kills it. It survives the
// removal of its tree (its writes then fail, and it goes on): only a kill
// ends it, so a test that expects it gone fails without the kill.
const HOLD = [
  "const fs = require('fs')",
  'const dir = process.env.NK_HOLD_DIR',
  'if (dir) {',
  "  fs.writeFileSync(require('path').join(dir, 'held-' + process.pid), '')",
  '  let i = 0',
  "  setInterval(() => { try { fs.writeFileSync('junk-' + i++, 'x'.repeat(1000)) } catch {} }, 5)",
  '}',
  '',
].join('\n')
const DATA = Object.fromEntries(Array.from({ length: 300 }, (_, i) => [`d${i}.js`, `module.exports = ${i}\n`]))
const SLOW = {
  name: 'nk-fixture-slow',
  version: '1.0.0',
  scripts: { postinstall: 'node hold.js' },
  files: { 'index.js': "module.exports = 'slow'\n", 'hold.js': HOLD, ...DATA },
  // The kill "1.5 s into npm install" lands while npm is still downloading.
  tarballDelayMs: 2500,
}
const SLOW_FILES = ['package.json', 'index.js', 'hold.js', ...Object.keys(DATA)]
// Its tarball is never answered: npm waits for it until killed. (Its install
// script makes npm, not nanokit's direct installer, install it.)
const HELD = { name: 'nk-fixture-held', version: '1.0.0', scripts: { postinstall: 'node -e 0' }, files: { 'index.js': "module.exports = 'held'\n" }, tarballDelayMs: Infinity }
// Longer than the 10 s after which an idle Tokio blocking thread retires.
const SLEEPY = { name: 'nk-fixture-sleepy', version: '1.0.0', files: { 'index.js': "module.exports = 'sleepy'\n" }, tarballDelayMs: 12500 }

// No timing is asserted. staleMs is ten minutes: only the dead-holder check
// can let the next worker in before its (one minute) timeout.
const WAIT = { staleMs: 600000, timeoutMs: 60000 }

describe('repo: killed installer with a real npm child', () => {
  let registry
  before(async () => {
    registry = await startRegistry({ extra: [SLOW, SLEEPY, HELD] })
  })
  after(async () => {
    await registry?.close()
  })
  // A private npm cache per run, so every install really downloads.
  const npmArgs = () => [...registry.npmArgs.filter((a) => !a.startsWith('--cache=')), `--cache=${tmp('npm-cache')}`]

  it('10 times: SIGKILL the lock holder mid-install; the next worker succeeds, no staging tree and no process is left', { timeout: 600_000 }, async () => {
    const spec = 'nk-fixture-slow@1.0.0'
    const alias = 'nk-fixture-slow_1.0.0'
    for (let run = 0; run < 10; run++) {
      const repo = tmp(`kill-${run}`)
      const holdDir = tmp(`hold-${run}`)
      const watcher = start('repo-watch.mjs', { repo, packages: [{ spec, alias, files: SLOW_FILES }] })
      const args = npmArgs()
      // Odd runs: killed while npm downloads. Even runs: killed while npm
      // runs the install script, which keeps writing into the staging tree.
      const holding = run % 2 === 0
      const a = start('repo-worker.mjs', { op: 'install', repo, specs: [spec], npmArgs: args, ...WAIT }, { env: holding ? { NK_HOLD_DIR: holdDir } : {} })
      assert.ok(await eventually(() => staging(repo).length > 0, 60000), 'the first worker started installing')
      const b = start('repo-worker.mjs', { op: 'install', repo, specs: [spec], npmArgs: args, ...WAIT }, { env: { NK_HOLD_DIR: '' } })
      await b.next(isEvent('start'))
      if (holding) assert.ok(await eventually(() => readdirSync(holdDir).length > 0, 60000), 'the install script runs')
      else await new Promise((r) => setTimeout(r, 1500))
      await a.kill()
      const done = await b.next(isEvent('done', 'error'))
      assert.equal(done.event, 'done', `run ${run}: ${JSON.stringify(done)}`)
      assert.equal(done.result.installed, true)
      await b.exited
      const report = await new Promise((resolve) => {
        watcher.send('stop')
        watcher.next((e) => 'passes' in e).then(resolve)
      })
      await watcher.exited
      assert.deepEqual(report.violations, [], `run ${run}: watcher (${report.passes} passes)`)
      assert.equal(nk.isInstalled(repo, spec), true)
      assert.equal(deps(repo)[alias], 'npm:nk-fixture-slow@1.0.0')
      assert.equal(require(join(repo, 'node_modules', alias)), 'slow')
      assert.deepEqual(staging(repo), [], `run ${run}: no staging tree is left`)
      // Everyone is done: nothing may still run inside the repository.
      const left = await eventually(() => processesIn(repo).length === 0, 2000)
      assert.ok(left, `run ${run}: processes outlived the install: ${JSON.stringify(processesIn(repo))}`)
    }
  })

  it('npm dies with its owner at once; repo status lists the orphaned tree (owner pid, dead); the next install of another package removes it', { timeout: 300_000 }, async () => {
    const repo = tmp('orphan')
    // npm waits for a tarball that never comes: it cannot finish by itself.
    const a = start('repo-worker.mjs', { op: 'install', repo, specs: ['nk-fixture-held@1.0.0'], npmArgs: npmArgs(), ...WAIT })
    assert.ok(await eventually(() => processesIn(repo, [a.child.pid]).length > 0, 60000), 'npm runs in the staging directory')
    await new Promise((r) => setTimeout(r, 500))
    await a.kill()
    // PR_SET_PDEATHSIG: npm does not outlive the process that started it,
    // even though nobody else is around to clean up.
    const gone = await eventually(() => processesIn(repo).length === 0, 5000)
    assert.ok(gone, `npm outlived its owner: ${JSON.stringify(processesIn(repo))}`)
    const [dir] = staging(repo)
    assert.ok(dir, 'the killed attempt left its staging tree')
    const status = JSON.parse(await cli('repo', 'status', repo, '--output', 'json'))
    assert.equal(status.staging.length, 1)
    const entry = status.staging[0]
    assert.equal(entry.path, join(repo, '.staging', dir))
    assert.equal(entry.owner.pid, a.child.pid)
    assert.equal(entry.ownerAlive, false)
    assert.equal(entry.orphaned, true)
    assert.equal(typeof entry.owner.installerPid, 'number')
    assert.equal(entry.installerRunning, false)
    const text = await cli('repo', 'status', repo)
    assert.match(text, new RegExp(`owner pid ${a.child.pid} on .* \\(dead\\)`))
    assert.match(text, /orphaned: removed by the next install of any package/)
    const r = await nk.install(repo, 'nk-fixture-dep@1.0.0', { npmArgs: registry.npmArgs })
    assert.equal(r.installed, true)
    assert.deepEqual(staging(repo), [], 'the orphaned tree of another package was removed')
  })

  it('an orphaned install script still writing into its staging tree is killed by the next installer of another package', { timeout: 300_000 }, async () => {
    const repo = tmp('orphan-script')
    const holdDir = tmp('orphan-hold')
    const a = start('repo-worker.mjs', { op: 'install', repo, specs: ['nk-fixture-slow@1.0.0'], npmArgs: npmArgs(), ...WAIT }, { env: { NK_HOLD_DIR: holdDir } })
    assert.ok(await eventually(() => readdirSync(holdDir).length > 0, 60000), 'the install script runs')
    await a.kill()
    await new Promise((r) => setTimeout(r, 300))
    const orphans = processesIn(repo)
    assert.ok(orphans.length > 0, 'the install script outlived npm (it is not npm\'s direct child)')
    const status = JSON.parse(await cli('repo', 'status', repo, '--output', 'json'))
    assert.equal(status.staging[0].installerRunning, true, JSON.stringify(status.staging))
    assert.equal(status.staging[0].ownerAlive, false)
    const r = await nk.install(repo, '@nkfix/scoped@2.0.0', { npmArgs: registry.npmArgs })
    assert.equal(r.installed, true)
    assert.deepEqual(processesIn(repo), [], 'the orphaned group was killed')
    assert.deepEqual(staging(repo), [], 'and its tree removed')
  })

  for (const how of ['a symlink', 'a relative path'])
  it(`an orphaned install script is found by the identity of its directory, with the repo given through ${how}`, { timeout: 300_000 }, async () => {
    const real = tmp('orphan-path')
    const parent = tmp('orphan-path-parent')
    // Both installers name the repo the same way; the orphan's working
    // directory, as the kernel reports it, is the real path.
    let repo
    let cwd
    if (how === 'a symlink') {
      repo = join(parent, 'link')
      symlinkSync(real, repo)
    } else {
      cwd = dirname(real)
      repo = basename(real)
    }
    const holdDir = tmp('orphan-path-hold')
    const a = start('repo-worker.mjs', { op: 'install', repo, specs: ['nk-fixture-slow@1.0.0'], npmArgs: npmArgs(), ...WAIT }, { env: { NK_HOLD_DIR: holdDir }, cwd })
    assert.ok(await eventually(() => readdirSync(holdDir).length > 0, 60000), 'the install script runs')
    await a.kill()
    await new Promise((r) => setTimeout(r, 300))
    assert.ok(processesIn(real).length > 0, 'the install script outlived npm')
    const b = start('repo-worker.mjs', { op: 'install', repo, specs: ['@nkfix/scoped@2.0.0'], npmArgs: registry.npmArgs, ...WAIT }, { cwd })
    const done = await b.next(isEvent('done', 'error'))
    assert.equal(done.event, 'done', JSON.stringify(done))
    assert.deepEqual(processesIn(real), [], 'the orphaned group was killed')
    assert.deepEqual(staging(real), [], 'and its tree removed')
  })

  it('an aborted install kills npm\'s whole process group and leaves nothing', { timeout: 300_000 }, async () => {
    const repo = tmp('abort')
    const holdDir = tmp('abort-hold')
    const ac = new AbortController()
    process.env.NK_HOLD_DIR = holdDir
    let p
    try {
      p = nk.install(repo, 'nk-fixture-slow@1.0.0', { npmArgs: npmArgs(), signal: ac.signal })
      assert.ok(await eventually(() => readdirSync(holdDir).length > 0, 60000), 'the install script runs')
    } finally {
      delete process.env.NK_HOLD_DIR
    }
    ac.abort()
    await assert.rejects(p, (e) => e.code === 'ENKABORTED')
    assert.deepEqual(processesIn(repo), [], 'npm and its script are gone')
    assert.deepEqual(staging(repo), [])
    assert.equal(nk.inspectLock(join(repo, '.locks', 'nk-fixture-slow_1.0.0.lock')), null)
    assert.equal(nk.isInstalled(repo, 'nk-fixture-slow@1.0.0'), false)
  })

  it('an npm install that outlives an idle thread timeout (12.5 s download) is not killed by its death signal', { timeout: 120_000 }, async () => {
    const repo = tmp('sleepy')
    const r = await nk.install(repo, 'nk-fixture-sleepy@1.0.0', { npmArgs: npmArgs() })
    assert.equal(r.installed, true)
    assert.equal(require(join(repo, 'node_modules', 'nk-fixture-sleepy_1.0.0')), 'sleepy')
  })
})
