// The shared repository's guarantees, checked at every instant by a watcher
// process while other processes install and are SIGKILLed, including inside
// the commit (NANOKIT_TEST_PAUSE_AT pauses it at a commit point):
//   installed ⇒ complete and listed in package.json; no half package visible.
import assert from 'node:assert/strict'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, it } from 'node:test'

import { killStarted, start } from './helpers/procs.mjs'

const require = createRequire(import.meta.url)
const nk = require('../nanokit.js')

afterEach(killStarted)

const tmp = (prefix) => mkdtempSync(join(tmpdir(), `nk-${prefix}-`))
// Same list as packageFiles() in helpers/repo-worker.mjs.
const packageFiles = (count) => ['package.json', ...Array.from({ length: count }, (_, i) => `f${String(i).padStart(4, '0')}.js`)]
const aliasOf = (spec) => spec.slice(0, spec.lastIndexOf('@')) + '_' + spec.slice(spec.lastIndexOf('@') + 1)
const keyOf = (spec) => aliasOf(spec).replace('/', '+')
const deps = (repo) => (existsSync(join(repo, 'package.json')) ? JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8')).dependencies || {} : {})
const isEvent = (...names) => (e) => names.includes(e.event)
// No timing is asserted; this only bounds how long a stuck worker may hang the run.
const WAIT = { timeoutMs: 60000, staleMs: 600000 }

function watch(repo, specs, files) {
  const packages = specs.map((spec) => ({ spec, alias: aliasOf(spec), files: packageFiles(files) }))
  const w = start('repo-watch.mjs', { repo, packages })
  return {
    async stop() {
      w.send('stop')
      const report = await w.next((e) => 'passes' in e)
      await w.exited
      return report
    },
  }
}

function assertComplete(repo, spec, files) {
  assert.equal(nk.isInstalled(repo, spec), true, `${spec} installed`)
  assert.ok(deps(repo)[aliasOf(spec)], `${spec} listed in package.json`)
  const names = new Set(readdirSync(join(repo, 'node_modules', aliasOf(spec))))
  assert.deepEqual(packageFiles(files).filter((f) => !names.has(f)), [], `${spec} complete`)
}

describe('repo invariants under kills inside the commit', () => {
  const FILES = 1000 // big enough that a copy instead of a rename would be seen half done
  for (const point of ['publish', 'manifest', 'sentinel']) {
    it(`SIGKILL paused at "${point}": never installed-but-incomplete or unlisted; the next worker completes`, { timeout: 300_000 }, async () => {
      for (let round = 0; round < 2; round++) {
        const repo = tmp(`inv-${point}`)
        const spec = `nk-inv-${point}@1.0.${round}`
        const alias = aliasOf(spec)
        const watcher = watch(repo, [spec], FILES)
        const a = start('repo-worker.mjs', { op: 'install', repo, specs: [spec], files: FILES, ...WAIT }, { env: { NANOKIT_TEST_PAUSE_AT: point } })
        await a.line(new RegExp(`^NANOKIT_TEST_PAUSED ${point} `))
        // What must (and must not) be visible at this instant of the commit.
        // The sentinel is written complete (stamped, then renamed into
        // place): once it is there, the package is installed.
        const complete = point === 'sentinel'
        assert.equal(nk.isInstalled(repo, spec), complete, `installed while paused at ${point}: ${complete}`)
        assert.equal(existsSync(join(repo, 'node_modules', alias, 'package.json')), true, 'published before the pause')
        const staged = readdirSync(join(repo, '.staging'))
        assert.equal(staged.length, 1, 'one attempt in .staging')
        assert.equal(existsSync(join(repo, '.staging', staged[0], 'node_modules', alias)), false, 'the staged package was moved, not copied')
        assert.equal(Boolean(deps(repo)[alias]), point !== 'publish', `listed in package.json at ${point}`)
        assert.equal(existsSync(join(repo, '.sentinels', `${keyOf(spec)}.done`)), point === 'sentinel', `sentinel present at ${point}`)
        // repo status: an install in progress is no leftover; its tree is listed once, under staging.
        const live = await nk.repo.status(repo)
        assert.deepEqual(live.leftovers, [], `nothing is left over while the install runs: ${JSON.stringify(live.leftovers)}`)
        assert.deepEqual(live.staging.map((e) => [e.path, e.orphaned]), [[join(repo, '.staging', staged[0]), false]])
        await a.kill()
        const dead = await nk.repo.status(repo)
        assert.deepEqual(dead.staging.map((e) => [e.path, e.orphaned]), [[join(repo, '.staging', staged[0]), true]])
        assert.deepEqual(dead.leftovers, complete ? [] : [join(repo, 'node_modules', alias)], 'the unfinished package, and not the staging tree again')
        assert.equal(nk.isInstalled(repo, spec), complete, `installed after a kill at ${point}: ${complete}`)
        // The next worker completes the install (or finds it complete); the
        // killed attempt's tree is swept by the next install of any package.
        const next = complete ? [spec, `nk-inv-other@1.0.${round}`] : [spec]
        const b = start('repo-worker.mjs', { op: 'install', repo, specs: next, files: FILES, ...WAIT })
        for (const s of next) {
          const done = await b.next((e) => isEvent('done', 'error')(e) && e.spec === s)
          assert.equal(done.event, 'done', JSON.stringify(done))
          assert.equal(done.result.installed, s !== spec || !complete, `${s} installed by the next worker`)
        }
        await b.exited
        const report = await watcher.stop()
        assert.deepEqual(report.violations, [], `watcher (${report.passes} passes)`)
        assert.ok(report.passes > 20, `the watcher ran (${report.passes} passes)`)
        assertComplete(repo, spec, FILES)
        assert.deepEqual(readdirSync(join(repo, '.staging')), [], 'no staging tree left')
        const lock = nk.inspectLock(join(repo, '.locks', `${keyOf(spec)}.lock`))
        // After a kill past the sentinel nobody needed the lock again: only
        // its dead holder's record is left, which the next taker breaks.
        if (complete) assert.equal(lock?.holderAlive ?? false, false, `the lock is free: ${JSON.stringify(lock)}`)
        else assert.equal(lock, null, 'the lock is free')
      }
    })
  }

  it('8 processes × 4 packages, an installer that does not wait: every entry reaches package.json; invariants hold throughout', { timeout: 300_000 }, async () => {
    for (let trial = 0; trial < 3; trial++) {
      const repo = tmp('inv-race')
      const groups = Array.from({ length: 8 }, (_, w) => Array.from({ length: 4 }, (_, i) => `nk-race-${w}-${i}@1.0.${trial}`))
      const all = groups.flat()
      const watcher = watch(repo, all, 3)
      const ws = groups.map((specs) => start('repo-worker.mjs', { op: 'install', repo, specs, files: 3, ...WAIT }))
      const finished = await Promise.all(ws.map((w) => w.next(isEvent('finished', 'crash'))))
      assert.deepEqual(finished.map((f) => f.event), Array(8).fill('finished'))
      const errors = ws.flatMap((w) => w.events.filter(isEvent('error')))
      assert.deepEqual(errors, [])
      const report = await watcher.stop()
      assert.deepEqual(report.violations, [], `trial ${trial}: watcher (${report.passes} passes)`)
      assert.deepEqual(Object.keys(deps(repo)).sort(), all.map(aliasOf).sort(), `trial ${trial}: package.json lists every install`)
      for (const spec of all) assertComplete(repo, spec, 3)
      assert.deepEqual(readdirSync(join(repo, '.staging')), [])
    }
  })
})

describe('the repo-wide package.json lock', () => {
  it('an install that reaches package.json while another holds it between its read and its write waits for it: no entry is lost', { timeout: 120_000 }, async () => {
    const repo = tmp('inv-manifest')
    const resume = tmp('inv-resume')
    const go = (who) => {
      mkdirSync(join(resume, who), { recursive: true })
      writeFileSync(join(resume, who, 'manifest-read'), '')
    }
    const env = (who) => ({ NANOKIT_TEST_PAUSE_AT: 'manifest-read', NANOKIT_TEST_RESUME_DIR: join(resume, who), NANOKIT_TEST_TRACE: '1' })
    const a = start('repo-worker.mjs', { op: 'install', repo, specs: ['nk-manifest-a@1.0.0'], files: 3, ...WAIT }, { env: env('a') })
    await a.line(/^NANOKIT_TEST_PAUSED manifest-read /)
    // A has read package.json and not written it yet. B must now wait for
    // the lock; without it, B would read the same package.json (and one of
    // the two entries would be lost when both write).
    const b = start('repo-worker.mjs', { op: 'install', repo, specs: ['nk-manifest-b@1.0.0'], files: 3, ...WAIT }, { env: env('b') })
    const first = await b.line(/^NANOKIT_TEST_(AT manifest-lock-wait|PAUSED manifest-read) /)
    assert.match(first, /AT manifest-lock-wait/, 'B read package.json while A was between its read and its write')
    go('a')
    await b.line(/^NANOKIT_TEST_PAUSED manifest-read /)
    go('b')
    for (const w of [a, b]) assert.equal((await w.next(isEvent('done', 'error'))).event, 'done')
    assert.deepEqual(Object.keys(deps(repo)).sort(), ['nk-manifest-a_1.0.0', 'nk-manifest-b_1.0.0'])
  })
})

describe('repo input rules', () => {
  it('specifiers that are not a valid npm name at an exact version → ENKSPEC everywhere, nothing written', async () => {
    const parent = tmp('inv-bad')
    const repo = join(parent, 'repo')
    const bad = [
      '..@1.0.0',
      '.@1.0.0',
      '.hidden@1.0.0',
      '@scope/..@1.0.0',
      '@../x@1.0.0',
      '@./x@1.0.0',
      '_x@1.0.0',
      'x@..',
      'x@.1.0.0',
      'x@1..0',
      'x@1.0.0/..',
      'A@1.0.0',
      '@Scope/x@1.0.0',
      'a@latest',
      'a@^1.0.0',
      'a@1',
      'a@1.0',
      'a@01.0.0',
    ]
    const { handleInstall, handleIsInstalled } = nk.createLockedHandlers(repo)
    for (const spec of bad) {
      const what = JSON.stringify(spec)
      assert.throws(() => nk.isInstalled(repo, spec), (e) => e.code === 'ENKSPEC', what)
      await assert.rejects(handleIsInstalled(spec, repo), (e) => e.code === 'ENKSPEC', what)
      await assert.rejects(nk.install(repo, spec), (e) => e.code === 'ENKSPEC', what)
      await assert.rejects(handleInstall(spec, repo), (e) => e.code === 'ENKSPEC', what)
      await assert.rejects(nk.install(repo, spec, { install: async () => assert.fail(`installer ran for ${what}`) }), (e) => e.code === 'ENKSPEC', what)
    }
    assert.match(
      (() => {
        try {
          nk.isInstalled(repo, 'a@latest')
        } catch (e) {
          return e.message
        }
      })(),
      /not an exact version/,
    )
    assert.deepEqual(readdirSync(parent), [], 'nothing was written anywhere')
  })

  it('a repoDir that cannot name a directory (empty, NUL, 10 MB) → ENKSPEC, with a short message', async () => {
    const cwd = process.cwd()
    const before = readdirSync(cwd)
    for (const [what, dir] of [
      ['empty', ''],
      ['NUL', '/tmp/a\0b'],
      ['10 MB', '/tmp/' + 'x'.repeat(10 * 1024 * 1024)],
    ]) {
      const { handleIsInstalled, handleInstall } = nk.createLockedHandlers(dir)
      const short = (e) => e.code === 'ENKSPEC' && e.message.length < 1000 && /repository directory/.test(e.message)
      assert.throws(() => nk.isInstalled(dir, 'x@1.0.0'), short, what)
      await assert.rejects(handleIsInstalled('x@1.0.0', dir), short, what)
      await assert.rejects(nk.install(dir, 'x@1.0.0', { install: async () => assert.fail('installer ran') }), short, what)
      await assert.rejects(handleInstall('x@1.0.0', dir), short, what)
    }
    assert.deepEqual(readdirSync(cwd), before, 'nothing written in the working directory')
  })
})
