#!/usr/bin/env node
// State backend benchmarks, measured in one run and printed as figures and
// ratios (never asserted):
//   1. a no-change `nanokit up` of one 200-service project with its state in
//      the local file, in S3 (SeaweedFS) and in Vault (OpenBao), over
//      loopback (target: each remote at most +30 ms over the file);
//   2. the deploy lock's round trip (acquire + release) on S3, against
//      Terraform's `use_lockfile` on the same SeaweedFS bucket: nanokit's
//      from the spans of its no-change ups (`state.lock` without the
//      once-per-process precondition probe, plus `state.unlock`); Terraform's
//      from its own log of `terraform plan` of an empty configuration (lock:
//      "Attempting to lock" to "Locked", unlock likewise; ms timestamps), and,
//      as a cross-check, the difference between that plan with and without
//      `-lock` (target: nanokit <= 0.5x Terraform);
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

function median(xs) {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

function timed(fn) {
  const t = process.hrtime.bigint()
  const r = fn()
  return [Number(process.hrtime.bigint() - t) / 1e6, r]
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

const backends = [
  ['file', null],
  ['s3', `s3://nanokit/${TAG}/state.json?endpoint=${s3}&path_style=true`],
  ['vault', `vault://${vaultAddr.replace(/^https?:\/\//, '')}/secret/${TAG}/state`],
]
const upMs = {}
const lockMs = {}
const probeMs = {}
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
  } finally {
    run(BIN, ['down', '-f', file, '--concurrency', '32'], { env, allowFail: true })
  }
}

// ---- 2. Terraform's use_lockfile on the same bucket ----------------------
let tfLockMs = null
let tfPlan = null
const tf = spawnSync('terraform', ['version'], { encoding: 'utf8' })
if (tf.status === 0) {
  const tfDir = join(work, 'terraform')
  mkdirSync(tfDir, { recursive: true })
  writeFileSync(
    join(tfDir, 'main.tf'),
    `terraform {
  backend "s3" {
    bucket                      = "nanokit"
    key                         = "${TAG}/terraform.tfstate"
    region                      = "us-east-1"
    endpoints                   = { s3 = "${s3}" }
    use_path_style              = true
    use_lockfile                = true
    access_key                  = "nanokit-bench"
    secret_key                  = "nanokit-bench-secret"
    skip_credentials_validation = true
    skip_requesting_account_id  = true
    skip_metadata_api_check     = true
    skip_region_validation      = true
  }
}
`,
  )
  writeFileSync(join(tfDir, 'cli.tfrc'), '')
  const tenv = { ...env, CHECKPOINT_DISABLE: '1', TF_IN_AUTOMATION: '1', TF_CLI_CONFIG_FILE: join(tfDir, 'cli.tfrc') }
  run('terraform', ['init', '-input=false', '-no-color'], { cwd: tfDir, env: tenv })
  const plan = (lock) => run('terraform', ['plan', '-input=false', '-no-color', `-lock=${lock}`], { cwd: tfDir, env: tenv })
  plan(true)
  // In pairs, back to back (so that drift of the machine's load hits both
  // alike), the order alternating; the lock's cost is the median of the
  // pairs' differences.
  const withLock = []
  const without = []
  const diffs = []
  for (let i = 0; i < TF_PAIRS; i++) {
    const a = timed(() => plan(i % 2 === 0))[0]
    const b = timed(() => plan(i % 2 !== 0))[0]
    const [w, wo] = i % 2 === 0 ? [a, b] : [b, a]
    withLock.push(w)
    without.push(wo)
    diffs.push(w - wo)
  }
  tfPlan = { withLock: median(withLock), without: median(without), diff: median(diffs) }
  // Terraform's own log times its lock and unlock (ms timestamps), as
  // nanokit's spans time its own: the same measure of the same work.
  const ts = (line) => Date.parse(line.slice(0, 24))
  const spans = []
  for (let i = 0; i < RUNS; i++) {
    const r = run('terraform', ['plan', '-input=false', '-no-color', '-lock=true'], { cwd: tfDir, env: { ...tenv, TF_LOG: 'INFO' } })
    const lines = r.stderr.split('\n')
    const at = (text) => ts(lines.find((l) => l.includes(text)) ?? '')
    const ms = at('Locked remote state') - at('Attempting to lock remote state') + at('Unlocked remote state') - at('Attempting to unlock remote state')
    if (Number.isFinite(ms)) spans.push(ms)
  }
  tfLockMs = spans.length ? median(spans) : tfPlan.diff
}

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
console.log(`  nanokit, S3 (SeaweedFS):   ${f(lockMs.s3)} (from the runs' spans; plus ${f(probeMs.s3)} once per process for the precondition probe)`)
console.log(`  nanokit, Vault (OpenBao):  ${f(lockMs.vault)} (plus ${f(probeMs.vault)} for the probe)`)
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
