// Hostile co-tenants from JS: a symlink or FIFO planted at a lock path or
// inside a shared repo is refused with ENKFOREIGN; nothing outside changes;
// nothing blocks (the FIFO cases run in a child process with a deadline).
import assert from 'node:assert/strict'
import { execFileSync, spawnSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, it } from 'node:test'

const require = createRequire(import.meta.url)
const nk = require('../nanokit.js')
const CLI = join(import.meta.dirname, '..', 'bin', 'nanokit.js')
const NANOKIT = join(import.meta.dirname, '..', 'nanokit.js')

const tmp = (prefix) => mkdtempSync(join(tmpdir(), `nk-${prefix}-`))
const VICTIM = 'precious content nanokit must never touch\n'

/** A directory outside every repo with a victim file; `untouched()` checks it byte for byte. */
function outside() {
  const dir = tmp('outside')
  writeFileSync(join(dir, 'victim'), VICTIM)
  const snap = () =>
    readdirSync(dir, { recursive: true })
      .sort()
      .map((f) => {
        try {
          return `${f}=${readFileSync(join(dir, f), 'utf8')}`
        } catch {
          return `${f}/`
        }
      })
      .join('\n')
  const before = snap()
  return {
    dir,
    victim: join(dir, 'victim'),
    untouched() {
      assert.equal(readFileSync(join(dir, 'victim'), 'utf8'), VICTIM)
      assert.equal(snap(), before, 'nothing written outside')
    },
  }
}

const foreign = (e) => e.code === 'ENKFOREIGN' && /symbolic link|FIFO/.test(e.message)

/** Runs `script` (with `nk` in scope) in a child Node killed after 20 s: a hang fails, not blocks the runner. */
function inChild(script) {
  const r = spawnSync(process.execPath, ['-e', `const nk = require(${JSON.stringify(NANOKIT)}); ${script}`], {
    encoding: 'utf8',
    timeout: 20_000,
    killSignal: 'SIGKILL',
  })
  assert.equal(r.signal, null, `the child was still blocked after 20 s (killed): ${r.stderr}`)
  return r
}

describe('co-tenants: lock paths', () => {
  it('a lockPath that is a symlink is an error, not a target, for every call', async () => {
    const out = outside()
    const link = join(tmp('lockpath'), 'job.lock')
    symlinkSync(out.victim, link)
    assert.throws(() => nk.tryAcquireLock(link, { staleMs: 50 }), foreign)
    await assert.rejects(nk.acquireLock(link, { staleMs: 50, timeoutMs: 500 }), foreign)
    assert.throws(() => nk.inspectLock(link), foreign)
    assert.throws(() => nk.breakLock(link), foreign)
    await assert.rejects(nk.withLock(link, async () => {}, { staleMs: 50, timeoutMs: 500 }), foreign)
    out.untouched()
  })

  it('inspectLock on a FIFO answers ENKFOREIGN at once instead of hanging the JS thread', () => {
    const dir = tmp('fifo')
    const fifo = join(dir, 'job.lock')
    execFileSync('mkfifo', [fifo])
    const r = inChild(`try { nk.inspectLock(${JSON.stringify(fifo)}); console.log('no error') } catch (e) { console.log(e.code, e.message) }`)
    assert.match(r.stdout, /^ENKFOREIGN .*job\.lock is a FIFO/, r.stdout + r.stderr)
    const t = inChild(`try { nk.tryAcquireLock(${JSON.stringify(fifo)}); console.log('no error') } catch (e) { console.log(e.code) }`)
    assert.match(t.stdout, /^ENKFOREIGN/, t.stdout + t.stderr)
  })
})

describe('co-tenants: shared repo', () => {
  it('a FIFO planted as a package lock: repo status and handleInstall fail with ENKFOREIGN, never hang', () => {
    const repo = tmp('repo-fifo')
    mkdirSync(join(repo, '.locks'))
    execFileSync('mkfifo', [join(repo, '.locks', 'left-pad_1.3.0.lock')])
    const s = spawnSync(process.execPath, [CLI, 'repo', 'status', repo], { encoding: 'utf8', timeout: 20_000, killSignal: 'SIGKILL' })
    assert.equal(s.signal, null, 'repo status was still blocked after 20 s (killed)')
    assert.notEqual(s.status, 0)
    assert.match(s.stderr, /ENKFOREIGN|is a FIFO/, s.stderr)
    const r = inChild(`
      const h = nk.createLockedHandlers(${JSON.stringify(repo)}, { install: async () => { console.log('installer ran') } })
      h.handleInstall('left-pad@1.3.0').then(() => console.log('no error'), (e) => console.log(e.code, e.message))`)
    assert.match(r.stdout, /^ENKFOREIGN /, r.stdout + r.stderr)
    assert.doesNotMatch(r.stdout, /installer ran/)
  })

  for (const folder of ['.locks', '.sentinels', 'node_modules', '.staging']) {
    it(`${folder} symlinked to a folder outside: handleInstall fails with ENKFOREIGN; nothing lands outside`, async () => {
      const out = outside()
      const repo = tmp('repo-link')
      symlinkSync(out.dir, join(repo, folder))
      const handlers = nk.createLockedHandlers(repo, {
        staleMs: 100,
        install: async (specifier, dir) => {
          // A careful installer: it writes only inside its staging dir.
          mkdirSync(join(dir, 'node_modules', 'left-pad_1.3.0'), { recursive: true })
          writeFileSync(join(dir, 'node_modules', 'left-pad_1.3.0', 'package.json'), '{"name":"left-pad"}')
        },
      })
      await assert.rejects(handlers.handleInstall('left-pad@1.3.0'), (e) => e.code === 'ENKFOREIGN' && e.message.includes(folder))
      assert.equal(await handlers.handleIsInstalled('left-pad@1.3.0'), false)
      out.untouched()
    })
  }
})
