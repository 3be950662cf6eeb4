#!/usr/bin/env node
// Reconciliation benchmarks, measured in one run and printed as figures and
// ratios (never asserted):
//   1. `nanokit plan` on a generated 1,000-service project, with the standalone
//      executable and with the npm CLI (node bin/nanokit.js), vs `terraform
//      plan` on 1,000 `terraform_data` resources with the same dependency shape
//      (skipped when terraform is not on PATH; it runs offline: terraform_data
//      is built in, so `terraform init` downloads nothing);
//   2. a no-change `nanokit up` on 200 running services (CLI process, and the
//      JS API in-process);
//   3. peak memory (max RSS) of a process that plans the 1,000 services,
//      against the same process without the plan.
// Usage: node bench/infra.mjs   (builds the standalone executable with
// `cargo build --release --bin nanokit` when missing or stale, or takes
// NANOKIT_STANDALONE_BIN; the addon it does not build: `npm run build` first)
import { spawnSync } from 'node:child_process'
import { mkdirSync, rmSync, writeFileSync } from 'node:fs'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const work = join(root, 'bench', '.work', 'infra')
const BIN = join(root, 'bin', 'nanokit.js')
const require = createRequire(import.meta.url)
const nk = require(join(root, 'nanokit.js'))
const RUNS = Number(process.env.BENCH_RUNS || 5)
// The standalone CLI costs milliseconds a run: take more samples of it.
const SA_RUNS = Math.max(RUNS, 21)

function standaloneBin() {
  if (process.env.NANOKIT_STANDALONE_BIN) return process.env.NANOKIT_STANDALONE_BIN
  const r = spawnSync('cargo', ['build', '--release', '--quiet', '--bin', 'nanokit'], { cwd: root, stdio: ['ignore', 'inherit', 'inherit'] })
  if (r.status !== 0) throw new Error(`cargo build --release --bin nanokit failed (${r.error?.message ?? `exit ${r.status}`})`)
  return join(process.env.CARGO_TARGET_DIR || join(root, 'target'), 'release', 'nanokit')
}
const SA_BIN = standaloneBin()

rmSync(work, { recursive: true, force: true })
mkdirSync(work, { recursive: true })

/** Dependency shape shared by both tools: i depends on i-1 within a block of
 * 10, and on the head of the previous block (i - 10) — a wide, deep DAG. */
function deps(i) {
  const d = []
  if (i % 10 !== 0) d.push(i - 1)
  if (i >= 10 && i % 10 === 0) d.push(i - 10)
  return d
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

function time(fn, runs = RUNS) {
  const xs = []
  for (let i = 0; i < runs; i++) {
    const t = process.hrtime.bigint()
    fn()
    xs.push(Number(process.hrtime.bigint() - t) / 1e6)
  }
  return median(xs)
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 28, ...opts })
  if (r.status !== 0 && !opts.allowFail) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr?.slice(-2000)}`)
  }
  return r
}

// ---- 1. plan: nanokit vs terraform ----------------------------------------
const N = 1000
const nkDir = join(work, 'nk1000')
mkdirSync(nkDir, { recursive: true })
let yml = 'name: bench\nservices:\n'
for (let i = 0; i < N; i++) {
  yml += `  s${i}:\n    start: "exec sleep 600"\n    env: { INDEX: "${i}" }\n`
  const d = deps(i)
  if (d.length) yml += `    depends_on: [${d.map((j) => `s${j}`).join(', ')}]\n`
}
writeFileSync(join(nkDir, 'nanokit.yml'), yml)
const nkFile = join(nkDir, 'nanokit.yml')
run(process.execPath, [BIN, 'plan', '-f', nkFile]) // warm the page cache
run(SA_BIN, ['plan', '-f', nkFile])
const nkPlanMs = time(() => run(process.execPath, [BIN, 'plan', '-f', nkFile]))
const saPlanMs = time(() => run(SA_BIN, ['plan', '-f', nkFile]), SA_RUNS)
// What spawning any process costs from here (part of every figure above).
const spawnMs = time(() => run('/bin/true', []), SA_RUNS)

let tfPlanMs = null
const tf = spawnSync('terraform', ['version'], { encoding: 'utf8' })
if (tf.status === 0) {
  const tfDir = join(work, 'tf1000')
  mkdirSync(tfDir, { recursive: true })
  let tfsrc = ''
  for (let i = 0; i < N; i++) {
    const d = deps(i)
    tfsrc += `resource "terraform_data" "s${i}" {\n  input = { start = "exec sleep 600", index = "${i}" }\n`
    if (d.length) tfsrc += `  depends_on = [${d.map((j) => `terraform_data.s${j}`).join(', ')}]\n`
    tfsrc += '}\n'
  }
  writeFileSync(join(tfDir, 'main.tf'), tfsrc)
  writeFileSync(join(tfDir, 'cli.tfrc'), '')
  const env = { ...process.env, CHECKPOINT_DISABLE: '1', TF_IN_AUTOMATION: '1', TF_CLI_CONFIG_FILE: join(tfDir, 'cli.tfrc') }
  run('terraform', ['init', '-input=false', '-no-color'], { cwd: tfDir, env })
  run('terraform', ['plan', '-input=false', '-no-color', '-lock=false'], { cwd: tfDir, env })
  tfPlanMs = time(() => run('terraform', ['plan', '-input=false', '-no-color', '-lock=false'], { cwd: tfDir, env }), Math.min(RUNS, 3))
}

// ---- 3. peak memory of plan ----------------------------------------------
function maxRss(script) {
  const r = run(process.execPath, ['-e', script], { cwd: root })
  return Number(r.stdout.trim()) / 1024 // KiB → MiB
}
const base = maxRss(`const nk=require('./nanokit.js');console.log(process.resourceUsage().maxRSS)`)
const withPlan = maxRss(
  `const nk=require('./nanokit.js');nk.plan({file:${JSON.stringify(nkFile)}}).then(()=>console.log(process.resourceUsage().maxRSS))`,
)

// ---- 2. no-change up on 200 running services ------------------------------
const M = 200
const upDir = join(work, 'up200')
mkdirSync(upDir, { recursive: true })
let y2 = 'name: bench-up\nservices:\n'
for (let i = 0; i < M; i++) {
  y2 += `  s${i}:\n    start: "exec sleep 600"\n`
  const d = deps(i)
  if (d.length) y2 += `    depends_on: [${d.map((j) => `s${j}`).join(', ')}]\n`
}
const upFile = join(upDir, 'nanokit.yml')
writeFileSync(upFile, y2)
let upCliMs, upApiMs, nodeStartMs
try {
  const t0 = process.hrtime.bigint()
  run(process.execPath, [BIN, 'up', '-f', upFile, '--concurrency', '32'])
  const firstUpMs = Number(process.hrtime.bigint() - t0) / 1e6
  console.error(`(first up of ${M} services: ${firstUpMs.toFixed(0)} ms)`)
  upCliMs = time(() => {
    const r = run(process.execPath, [BIN, 'up', '-f', upFile])
    if (!/0 changed/.test(r.stderr)) throw new Error(`not a no-change up: ${r.stderr.slice(-500)}`)
  })
  nodeStartMs = time(() => run(process.execPath, ['-e', `require(${JSON.stringify(join(root, 'nanokit.js'))})`]))
  const xs = []
  for (let i = 0; i < RUNS; i++) {
    const t = process.hrtime.bigint()
    const r = await nk.up({ file: upFile })
    xs.push(Number(process.hrtime.bigint() - t) / 1e6)
    if (r.services.some((s) => s.outcome !== 'unchanged')) throw new Error('not a no-change up')
  }
  upApiMs = median(xs)
} finally {
  run(process.execPath, [BIN, 'down', '-f', upFile, '--concurrency', '32'])
}

// ---- report ---------------------------------------------------------------
const f = (x) => `${x.toFixed(1)} ms`
console.log(`nanokit reconciliation benchmarks (median of ${RUNS} runs; 2-core machine)`)
console.log('')
console.log(`plan, ${N} services (fresh: all creates):`)
console.log(`  nanokit plan, standalone executable (median of ${SA_RUNS}): ${f(saPlanMs)}`)
console.log(`  nanokit plan, npm CLI (incl. node start-up):        ${f(nkPlanMs)}`)
console.log(`  (spawning /bin/true from here: ${f(spawnMs)}, part of every figure)`)
if (tfPlanMs !== null) {
  console.log(`  terraform plan, ${N} terraform_data:                ${f(tfPlanMs)}`)
  console.log(`  ratio, standalone: nanokit is ${(tfPlanMs / saPlanMs).toFixed(1)}x faster (target >= 30x, moonshot 50x)`)
  console.log(`  ratio, npm CLI:    nanokit is ${(tfPlanMs / nkPlanMs).toFixed(1)}x faster (target >= 20x)`)
} else {
  console.log('  terraform not found: comparison skipped')
}
console.log('')
console.log(`no-change up, ${M} running services:`)
console.log(`  CLI process (incl. ${f(nodeStartMs)} node + addon start-up): ${f(upCliMs)} (target <= 150 ms)`)
console.log(`  JS API in-process:                                 ${f(upApiMs)}`)
console.log('')
console.log(`peak memory (max RSS) of a process planning ${N} services: ${withPlan.toFixed(1)} MiB`)
console.log(`  same process without the plan: ${base.toFixed(1)} MiB; plan adds ${(withPlan - base).toFixed(1)} MiB`)
