// Terraform's S3 `use_lockfile` lock round trip on a bucket, measured as
// bench/state.mjs and bench/state-lock-designs.mjs quote it: from Terraform's
// own log of `terraform plan` of an empty configuration (lock: "Attempting to
// lock" to "Locked", unlock likewise; ms timestamps), and, as a cross-check,
// the median of paired differences of that plan with and without `-lock`
// (the prescribed measure), with a 95% interval of that median; and
// the time between holding the lock and starting its release (from the log).
// Returns null when terraform is not on PATH.
import { spawnSync } from 'node:child_process'
import { mkdirSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

function run(cmd, args, opts) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 28, ...opts })
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${(r.stderr || '').slice(-2000)}`)
  return r
}

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

/** A distribution-free 95% interval of the median of `xs` (order
 * statistics n/2 -+ 0.98 sqrt(n)): [low, high]. */
export function medianInterval(xs) {
  const s = [...xs].sort((a, b) => a - b)
  const h = 0.98 * Math.sqrt(s.length)
  return [s[Math.max(0, Math.floor(s.length / 2 - h))], s[Math.min(s.length - 1, Math.ceil(s.length / 2 + h))]]
}

export function timed(fn) {
  const t = process.hrtime.bigint()
  const r = fn()
  return [Number(process.hrtime.bigint() - t) / 1e6, r]
}

/**
 * @param {{dir: string, s3: string, key: string, env: object, runs: number, pairs: number, between?: (i: number) => void}} o
 *   `s3`: the endpoint (bucket `nanokit`); `env`: with AWS_ACCESS_KEY_ID and
 *   AWS_SECRET_ACCESS_KEY of the bucket; `between`: called after each pair
 *   (what is compared with Terraform, measured under the same conditions).
 */
export function terraformLock({ dir, s3, key, env, runs, pairs, between }) {
  if (spawnSync('terraform', ['version'], { encoding: 'utf8' }).status !== 0) return null
  rmSync(dir, { recursive: true, force: true })
  mkdirSync(dir, { recursive: true })
  writeFileSync(
    join(dir, 'main.tf'),
    `terraform {
  backend "s3" {
    bucket                      = "nanokit"
    key                         = "${key}"
    region                      = "us-east-1"
    endpoints                   = { s3 = "${s3}" }
    use_path_style              = true
    use_lockfile                = true
    access_key                  = "${env.AWS_ACCESS_KEY_ID}"
    secret_key                  = "${env.AWS_SECRET_ACCESS_KEY}"
    skip_credentials_validation = true
    skip_requesting_account_id  = true
    skip_metadata_api_check     = true
    skip_region_validation      = true
  }
}
`,
  )
  writeFileSync(join(dir, 'cli.tfrc'), '')
  const tenv = { ...env, CHECKPOINT_DISABLE: '1', TF_IN_AUTOMATION: '1', TF_CLI_CONFIG_FILE: join(dir, 'cli.tfrc') }
  run('terraform', ['init', '-input=false', '-no-color'], { cwd: dir, env: tenv })
  const plan = (lock, extra = {}) =>
    run('terraform', ['plan', '-input=false', '-no-color', `-lock=${lock}`], { cwd: dir, env: { ...tenv, ...extra } })
  plan(true)
  // In pairs, back to back (so that drift of the machine's load hits both
  // alike), the order alternating; the lock's cost is the median of the
  // pairs' differences.
  const withLock = []
  const without = []
  const diffs = []
  for (let i = 0; i < pairs; i++) {
    const a = timed(() => plan(i % 2 === 0))[0]
    const b = timed(() => plan(i % 2 !== 0))[0]
    const [w, wo] = i % 2 === 0 ? [a, b] : [b, a]
    withLock.push(w)
    without.push(wo)
    diffs.push(w - wo)
    between?.(i)
  }
  const planMs = pairs ? { withLock: median(withLock), without: median(without), diff: median(diffs), interval: medianInterval(diffs) } : null
  // Terraform's own log times its lock and unlock (ms timestamps), as
  // nanokit's spans time its own: the same measure of the same work.
  const ts = (line) => Date.parse(line.slice(0, 24))
  const spans = []
  const gaps = []
  for (let i = 0; i < runs; i++) {
    const lines = plan(true, { TF_LOG: 'INFO' }).stderr.split('\n')
    const at = (text) => ts(lines.find((l) => l.includes(text)) ?? '')
    const ms = at('Locked remote state') - at('Attempting to lock remote state') + at('Unlocked remote state') - at('Attempting to unlock remote state')
    if (Number.isFinite(ms)) spans.push(ms)
    // The time between holding the lock and starting to release it.
    const gap = at('Attempting to unlock remote state') - at('Locked remote state')
    if (Number.isFinite(gap)) gaps.push(gap)
  }
  return { logMs: spans.length ? median(spans) : planMs?.diff ?? null, gapMs: gaps.length ? median(gaps) : null, plan: planMs }
}
