#!/usr/bin/env node
// `up` of the example project (examples/basic: 3 process services, a port
// probe, a healthcheck, hooks), timed from the CLI's start until it returns
// with every service healthy; `down` after each run is not timed. Printed as
// figures (never asserted).
//
// With NANOKIT_ANCHOR=<another checkout, built> the same runs alternate
// between that checkout's CLI and this one's, on the same copy of the
// example, and the ratio this/anchor is printed: how a change moves `up`.
//
// Usage: node bench/example.mjs            (BENCH_RUNS=n, default 11; median)
//        NANOKIT_ANCHOR=/path/to/old/checkout node bench/example.mjs
// Needs: the addon built (`npm run build`) in each checkout.
import { spawnSync } from 'node:child_process'
import { cpSync, rmSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const work = join(root, 'bench', '.work', 'example')
const RUNS = Number(process.env.BENCH_RUNS || 11)
const anchor = process.env.NANOKIT_ANCHOR

rmSync(work, { recursive: true, force: true })
cpSync(join(root, 'examples', 'basic'), work, { recursive: true })
const yml = join(work, 'nanokit.yml')

function cli(checkout, ...args) {
  const r = spawnSync(process.execPath, [join(checkout, 'bin', 'nanokit.js'), ...args, '-f', yml], {
    cwd: work,
    encoding: 'utf8',
  })
  if (r.status !== 0) throw new Error(`${checkout}: nanokit ${args.join(' ')} exited ${r.status}:\n${r.stderr.slice(-2000)}`)
}

function timedUp(checkout) {
  const t = process.hrtime.bigint()
  cli(checkout, 'up')
  const ms = Number(process.hrtime.bigint() - t) / 1e6
  cli(checkout, 'down', '--yes')
  return ms
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

const tools = anchor ? { this: root, anchor } : { this: root }
const t = Object.fromEntries(Object.keys(tools).map((k) => [k, []]))
cli(root, 'down', '--yes')
for (const k of Object.keys(tools)) timedUp(tools[k]) // warm-up
for (let r = 0; r < RUNS; r++) {
  const order = r % 2 === 0 ? Object.keys(tools) : Object.keys(tools).reverse()
  for (const k of order) t[k].push(timedUp(tools[k]))
}
console.log(`examples/basic: \`up\` until healthy, median of ${RUNS}`)
for (const k of Object.keys(tools)) {
  const xs = t[k]
  console.log(`  ${k.padEnd(7)} ${median(xs).toFixed(0).padStart(6)} ms   (min ${Math.min(...xs).toFixed(0)}, max ${Math.max(...xs).toFixed(0)})  ${tools[k]}`)
}
if (anchor) {
  const ratios = t.this.map((x, i) => x / t.anchor[i])
  console.log(`  this/anchor, pair by pair: median ${median(ratios).toFixed(2)}× (min ${Math.min(...ratios).toFixed(2)}, max ${Math.max(...ratios).toFixed(2)})`)
}
rmSync(work, { recursive: true, force: true })
