// A child process of __test__/kv.spec.mjs: opens the state store described
// by argv[2] (JSON) and increments a counter or contends for a lock, then
// prints one JSON result line.
import { openSync, closeSync, unlinkSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { createRequire } from 'node:module'

const require = createRequire(import.meta.url)
const { openState } = require('../../kv-wrapper.js')

const job = JSON.parse(process.argv[2])
const state = await openState(job.options)

if (job.mode === 'incr') {
  const sync = state.backend === 'embedded' && job.sync
  for (let i = 0; i < job.n; i++) {
    if (sync) state.incrementSync('counter', 1)
    else await state.increment('counter', 1)
  }
  console.log(JSON.stringify({ incremented: job.n }))
} else if (job.mode === 'lock') {
  const holder = `child-${job.id}-${process.pid}`
  let acquired = 0
  let overlaps = 0
  for (let i = 0; i < job.n; i++) {
    await state.lock('critical', holder, 60, { waitMs: 60_000 })
    acquired++
    // Critical section: an exclusive marker (fails if anyone else is inside)
    // and an unprotected read-modify-write of a counter file.
    let alone = true
    let fd
    try {
      fd = openSync(join(job.dir, 'inside'), 'wx')
    } catch {
      alone = false
    }
    let n = 0
    try {
      n = Number(readFileSync(join(job.dir, 'counter'), 'utf8')) || 0
    } catch {}
    await new Promise((r) => setImmediate(r))
    writeFileSync(join(job.dir, 'counter'), String(n + 1))
    if (alone) {
      closeSync(fd)
      unlinkSync(join(job.dir, 'inside'))
    } else {
      overlaps++
    }
    await state.unlock('critical', holder)
  }
  console.log(JSON.stringify({ acquired, overlaps }))
} else {
  throw new Error(`unknown mode ${job.mode}`)
}
