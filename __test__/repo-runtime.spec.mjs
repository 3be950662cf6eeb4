// The real OpenFn runtime (@openfn/runtime, a devDependency from the npm
// registry) runs a job with every adaptor nanokit installed, from a repo that
// 4 processes populated at once through the content-addressed store.
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, afterEach, before, describe, it } from 'node:test'

import { adaptorFixtures } from './helpers/adaptors.mjs'
import { startRegistry } from './helpers/registry.mjs'
import { killStarted, start } from './helpers/procs.mjs'

afterEach(killStarted)

const JOB = join(import.meta.dirname, 'helpers', 'runtime-job.mjs')
const isEvent = (...names) => (e) => names.includes(e.event)

describe('OpenFn runtime on a nanokit repo', () => {
  const fx = adaptorFixtures({ scale: 0.1 })
  let registry
  before(async () => {
    registry = await startRegistry({ extra: [...fx.libs, ...fx.adaptors] })
  })
  after(async () => {
    await registry?.close()
  })

  it('loads every adaptor installed by 4 processes at once (two versions of one among them)', { timeout: 300_000 }, async () => {
    const repo = mkdtempSync(join(tmpdir(), 'nk-runtime-'))
    const ws = Array.from({ length: 4 }, (_, i) => {
      const order = [...fx.specs.slice(i), ...fx.specs.slice(0, i)]
      return start('repo-worker.mjs', { op: 'install', repo, specs: order, npmArgs: registry.npmArgs, staleMs: 600000, timeoutMs: 240000 })
    })
    const finished = await Promise.all(ws.map((w) => w.next(isEvent('finished', 'crash'))))
    assert.deepEqual(finished.map((f) => f.event), Array(4).fill('finished'))
    assert.deepEqual(ws.flatMap((w) => w.events.filter(isEvent('error'))), [])
    for (const spec of fx.specs) {
      const r = spawnSync(process.execPath, ['--experimental-vm-modules', '--no-warnings', JOB, repo, spec], { encoding: 'utf8', timeout: 60_000 })
      assert.equal(r.status, 0, `${spec}: ${r.stderr}`)
      const state = JSON.parse(r.stdout.trim().split('\n').pop())
      assert.deepEqual(state.data, { adaptor: spec, ran: true }, spec)
    }
  })
})
