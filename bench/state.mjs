#!/usr/bin/env node
// State backend benchmarks, measured in one run and printed as figures and
// ratios (never asserted):
//   1. a no-change `nanokit up` of one 200-service project with its state in
//      the local file, in S3 (SeaweedFS) and in Vault (OpenBao), over
//      loopback (target: each remote at most +30 ms over the file);
//   2. the deploy lock's round trip (acquire + release) on S3, against
//      Terraform's `use_lockfile` on the same SeaweedFS bucket: nanokit's
//      from the spans of its no-change ups (`state.lock` without the
//      once-per-process precondition probe, plus `state.unlock`, and the
//      store requests made inside them: `state.lock.put`, `state.lock.get`,
//      `state.get`); Terraform's from its own log of `terraform plan` of an
//      empty configuration (bench/lib/terraform-s3.mjs), and, as a
//      cross-check, the difference between that plan with and without
//      `-lock` (target: nanokit <= 0.5x Terraform; what every design's
//      requests cost that store: bench/state-lock-designs.mjs);
//   3. a no-change `up` of the 200-service project (local file) through the
//      JS API in one process, with `infra.state_encryption` (passphrase) on
//      against off (target: at most +10 ms; PBKDF2 runs once per process).
// Usage: node bench/state.mjs   (starts the test stores with
// scripts/state-test-servers.sh unless NANOKIT_TEST_S3_ENDPOINT & co. are
// set; builds the standalone executable with `cargo build --release --bin
// nanokit` when missing or stale, or takes NANOKIT_STANDALONE_BIN; Terraform
// from PATH, skipped when missing).
import { spawnSync } from 'node:child_process'
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'
import { median, terraformLock, timed } from './lib/terraform-s3.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const work = join(root, 'bench', '.work', 'state')
const RUNS = Number(process.env.BENCH_RUNS || 11)
const TAG = `b${process.pid}`
// A lock's cost is a few ms out of a ~70 ms terraform plan: many pairs.
const TF_PAIRS = Number(process.env.BENCH_TF_PAIRS || 41)

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 28, ...opts })
  if (r.status !== 0 && !opts.allowFail) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${(r.stderr || '').slice(-2000)}`)
  }
  return r
}


// The stores.
const env = { ...process.env }
if (!env.NANOKIT_TEST_S3_ENDPOINT) {
  const r = run('bash', [join(root, 'scripts', 'state-test-servers.sh')], { cwd: root })
  for (const line of r.stdout.split('\n')) {
    const m = /^export (\w+)=(.*)$/.exec(line.trim())
    if (m) env[m[1]] = m[2]
  }
}
const s3 = env.NANOKIT_TEST_S3_ENDPOINT
const vaultAddr = env.NANOKIT_TEST_VAULT_ADDR
Object.assign(env, {
  AWS_ACCESS_KEY_ID: 'nanokit-bench',
  AWS_SECRET_ACCESS_KEY: 'nanokit-bench-secret',
  AWS_REGION: 'us-east-1',
  AWS_EC2_METADATA_DISABLED: 'true',
  VAULT_ADDR: vaultAddr,
  VAULT_TOKEN: env.NANOKIT_TEST_VAULT_TOKEN,
})

function standaloneBin() {
  if (process.env.NANOKIT_STANDALONE_BIN) return process.env.NANOKIT_STANDALONE_BIN
  const r = spawnSync('cargo', ['build', '--release', '--quiet', '--bin', 'nanokit'], { cwd: root, stdio: ['ignore', 'inherit', 'inherit'] })
  if (r.status !== 0) throw new Error(`cargo build --release --bin nanokit failed (${r.error?.message ?? `exit ${r.status}`})`)
  return join(process.env.CARGO_TARGET_DIR || join(root, 'target'), 'release', 'nanokit')
}
const BIN = standaloneBin()

rmSync(work, { recursive: true, force: true })
mkdirSync(work, { recursive: true })

// ---- 1. no-change up of 200 services per backend -------------------------
const M = 200
function project(name, state) {
  let y = `name: ${name}\n`
  if (state) y += `infra:\n  state: "${state}"\n`
  y += 'services:\n'
  for (let i = 0; i < M; i++) {
    y += `  s${i}:\n    start: "exec sleep 600"\n`
    if (i % 10 !== 0) y += `    depends_on: [s${i - 1}]\n`
  }
  return y
}

/** Spans of one trace file by name: total ms. */
function spanMs(traceFile, name) {
  const t = JSON.parse(readFileSync(traceFile, 'utf8'))
  return t.spans.filter((s) => s.name === name).reduce((a, s) => a + (s.end_unix_nano - s.start_unix_nano) / 1e6, 0)
}

/** The store requests (spans `state.lock.put`, `state.lock.get`,
 * `state.get`) made inside the run's `state.lock` and `state.unlock`. */
function lockRequests(traceFile) {
  const t = JSON.parse(readFileSync(traceFile, 'utf8'))
  const count = (name) => {
    const ids = new Set(t.spans.filter((s) => s.name === name).map((s) => s.span_id))
    return t.spans.filter((s) => ids.has(s.parent_span_id) && /^state\.(lock\.)?(get|put)$/.test(s.name)).length
  }
  return [count('state.lock'), count('state.unlock')]
}

const backends = [
  ['file', null],
  ['s3', `s3://nanokit/${TAG}/state.json?endpoint=${s3}&path_style=true`],
  ['vault', `vault://${vaultAddr.replace(/^https?:\/\//, '')}/secret/${TAG}/state`],
]
const upMs = {}
const lockMs = {}
const probeMs = {}
const lockReqs = {}
for (const [kind, state] of backends) {
  const dir = join(work, kind)
  mkdirSync(dir, { recursive: true })
  const file = join(dir, 'nanokit.yml')
  writeFileSync(file, project(`bench-state-${kind}`, state))
  try {
    run(BIN, ['up', '-f', file, '--concurrency', '32'], { env })
    const xs = []
    for (let i = 0; i < RUNS; i++) {
      const [ms, r] = timed(() => run(BIN, ['up', '-f', file], { env }))
      if (!/0 changed/.test(r.stderr)) throw new Error(`not a no-change up: ${r.stderr.slice(-500)}`)
      xs.push(ms)
    }
    upMs[kind] = median(xs)
    // The traces of the no-change ups (the last RUNS of them).
    const traces = join(dir, '.nanokit', 'traces')
    const files = readdirSync(traces).filter((f) => f.endsWith('.json')).sort().slice(-RUNS)
    lockMs[kind] = median(files.map((f) => spanMs(join(traces, f), 'state.lock') - spanMs(join(traces, f), 'state.probe') + spanMs(join(traces, f), 'state.unlock')))
    probeMs[kind] = median(files.map((f) => spanMs(join(traces, f), 'state.probe')))
    const reqs = files.map((f) => lockRequests(join(traces, f)))
    lockReqs[kind] = [median(reqs.map((r) => r[0])), median(reqs.map((r) => r[1]))]
  } finally {
    run(BIN, ['down', '-f', file, '--concurrency', '32'], { env, allowFail: true })
  }
}

// ---- 2. Terraform's use_lockfile on the same bucket ----------------------
const tf = terraformLock({ dir: join(work, 'terraform'), s3, key: `${TAG}/terraform.tfstate`, env, runs: RUNS, pairs: TF_PAIRS })
const tfLockMs = tf?.logMs ?? null
const tfPlan = tf?.plan

// ---- 3. encryption on vs off, in-process (JS API) -------------------------
const require = createRequire(import.meta.url)
const nk = require(join(root, 'nanokit.js'))
process.env.NK_BENCH_STATE_PASS = 'a bench passphrase, long enough'
const cryptMs = {}
for (const [kind, infra] of [
  ['plain', ''],
  ['encrypted', 'infra:\n  state_encryption:\n    passphrase: { env: NK_BENCH_STATE_PASS }\n'],
]) {
  const dir = join(work, `crypt-${kind}`)
  mkdirSync(dir, { recursive: true })
  const file = join(dir, 'nanokit.yml')
  writeFileSync(file, project(`bench-crypt-${kind}`, null).replace('services:\n', `${infra}services:\n`))
  try {
    await nk.up({ file, concurrency: 32 })
    await nk.up({ file }) // the key is derived here, once for the process
    const xs = []
    for (let i = 0; i < RUNS; i++) {
      const t = process.hrtime.bigint()
      const r = await nk.up({ file })
      xs.push(Number(process.hrtime.bigint() - t) / 1e6)
      if (r.services.some((s) => s.outcome !== 'unchanged')) throw new Error('not a no-change up')
    }
    cryptMs[kind] = median(xs)
    if (kind === 'encrypted' && readFileSync(join(dir, '.nanokit', 'state.json'), 'utf8').includes('"s0"')) {
      throw new Error('the state is not encrypted')
    }
  } finally {
    await nk.down({ file, concurrency: 32 })
  }
}

// ---- report ---------------------------------------------------------------
const f = (x) => `${x.toFixed(1)} ms`
console.log(`nanokit state backend benchmarks (median of ${RUNS} runs; standalone executable; stores on loopback)`)
console.log('')
console.log(`no-change up, ${M} running services:`)
for (const [kind] of backends) {
  const extra = kind === 'file' ? '' : ` (${upMs[kind] - upMs.file >= 0 ? '+' : ''}${(upMs[kind] - upMs.file).toFixed(1)} ms over the file; target <= +30 ms)`
  console.log(`  ${kind.padEnd(6)} ${f(upMs[kind])}${extra}`)
}
console.log('')
console.log('deploy lock round trip (acquire + release):')
const reqs = (kind) => `requests: ${lockReqs[kind][0]} to take, ${lockReqs[kind][1]} to release`
console.log(`  nanokit, S3 (SeaweedFS):   ${f(lockMs.s3)} (from the runs' spans; ${reqs('s3')}; plus ${f(probeMs.s3)} once per process for the precondition probe)`)
console.log(`  nanokit, Vault (OpenBao):  ${f(lockMs.vault)} (${reqs('vault')}; plus ${f(probeMs.vault)} for the probe)`)
console.log(`  nanokit, file:             ${f(lockMs.file)}`)
if (tfLockMs !== null) {
  console.log(`  terraform use_lockfile, same bucket: ${f(tfLockMs)} (from its log; cross-check: plan of an empty configuration ${f(tfPlan.withLock)} with -lock, ${f(tfPlan.without)} without, median of ${TF_PAIRS} paired differences ${f(tfPlan.diff)})`)
  console.log(`  ratio: nanokit's S3 lock is ${(lockMs.s3 / tfLockMs).toFixed(2)}x Terraform's (target <= 0.5x); with the probe ${((lockMs.s3 + probeMs.s3) / tfLockMs).toFixed(2)}x`)
} else {
  console.log('  terraform not found: comparison skipped')
}
console.log('')
console.log(`no-change up, ${M} running services, JS API in one process (local file):`)
console.log(`  state in the clear:     ${f(cryptMs.plain)}`)
console.log(`  state encrypted:        ${f(cryptMs.encrypted)} (${cryptMs.encrypted - cryptMs.plain >= 0 ? '+' : ''}${(cryptMs.encrypted - cryptMs.plain).toFixed(1)} ms; target <= +10 ms)`)
