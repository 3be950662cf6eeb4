#!/usr/bin/env node
// Issue 29's benchmark: nanokit's shared repo (content-addressed store, hard
// links) against plain npm installing every alias into one shared tree (what
// OpenFn's runtime does) and pnpm with its store inside the repo
// (node-linker=hoisted), in this one run, on one fixture set served by the
// offline fixture registry: 6 adaptors (two versions of one) sharing 3
// libraries. Prints ratios.
//
//   node scripts/build.mjs && node bench/repo.mjs
import { execFile, spawn } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'

import { adaptorFixtures } from '../__test__/helpers/adaptors.mjs'
import { startRegistry } from '../__test__/helpers/registry.mjs'

const require = createRequire(import.meta.url)
const nk = require('../nanokit.js')
const run = promisify(execFile)
const WORKER = fileURLToPath(new URL('../__test__/helpers/repo-worker.mjs', import.meta.url))
const PNPM = fileURLToPath(new URL('../node_modules/pnpm/bin/pnpm.cjs', import.meta.url))

const work = mkdtempSync(join(tmpdir(), 'nk-bench-repo-'))
const fx = adaptorFixtures({ scale: 1 })
const registry = await startRegistry({ extra: [...fx.libs, ...fx.adaptors] })
// One warm npm cache for npm and nanokit (npm's cache is what makes npm's
// incremental install fast); pnpm keeps its store in each repo, as asked.
const cache = join(work, 'npm-cache')
const npmArgs = [`--registry=${registry.url}`, `--cache=${cache}`, '--no-update-notifier']
const aliasOf = (spec) => spec.slice(0, spec.lastIndexOf('@')) + '_' + spec.slice(spec.lastIndexOf('@') + 1)
const npmSpec = (spec) => `${aliasOf(spec)}@npm:${spec}`
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const ms = (t0) => performance.now() - t0
let dirs = 0
const { availableParallelism, loadavg } = await import('node:os')
const cores = availableParallelism()
const loadAtStart = loadavg().map((l) => l.toFixed(2)).join(' ')
const fresh = (name) => {
  const d = join(work, `${name}-${dirs++}`)
  mkdirSync(d)
  writeFileSync(join(d, 'package.json'), JSON.stringify({ name: 'repo', private: true }))
  return d
}
/** Disk used by a directory, each file counted once (du). */
async function disk(dir) {
  const { stdout } = await run('du', ['-sk', dir])
  return Number(stdout.split('\t')[0]) * 1024
}

const npmInstall = (dir, specs) => run('npm', ['install', '--no-audit', '--no-fund', ...specs.map(npmSpec), ...npmArgs], { cwd: dir })
const pnpmAdd = (dir, specs) =>
  run(process.execPath, [PNPM, 'add', ...specs.map(npmSpec), `--registry=${registry.url}`, '--config.node-linker=hoisted', `--store-dir=${join(dir, '.pnpm-store')}`, `--cache-dir=${join(work, 'pnpm-cache')}`, '--reporter=silent'], { cwd: dir })
const nkInstall = (dir, spec) => nk.install(dir, spec, { npmArgs })

// Warm npm's cache with every package once.
await npmInstall(fresh('warm'), fx.specs)

// 1. Repo disk after all 6 adaptors, one after another.
const nkRepo = fresh('nanokit')
for (const spec of fx.specs) await nkInstall(nkRepo, spec)
const npmRepo = fresh('npm')
for (const spec of fx.specs) await npmInstall(npmRepo, [spec])
const pnpmRepo = fresh('pnpm')
for (const spec of fx.specs) await pnpmAdd(pnpmRepo, [spec])
const [nkDisk, npmDisk, pnpmDisk] = [await disk(nkRepo), await disk(npmRepo), await disk(pnpmRepo)]
const status = await nk.repo.status(nkRepo)

// 2. An install whose files are all in the store already: an adaptor
// reinstalled after its directory was removed (a wipe, a crash before its
// sentinel), against npm's incremental install of it into the shared tree
// (its cache warm) and pnpm's (its store in the repo holding the files).
const again = fx.specs[2]
const reinstall = { nanokit: [], npm: [], pnpm: [] }
for (let round = 0; round < 3; round++) {
  rmSync(join(nkRepo, 'node_modules', aliasOf(again)), { recursive: true, force: true })
  rmSync(join(nkRepo, '.sentinels', `${aliasOf(again).replace('/', '+')}.done`), { force: true })
  let t0 = performance.now()
  const r = await nkInstall(nkRepo, again)
  if (!r.installed || r.attempts !== 0) throw new Error(`nanokit did not reinstall by links alone: ${JSON.stringify(r)}`)
  reinstall.nanokit.push(ms(t0))
  rmSync(join(npmRepo, 'node_modules', aliasOf(again)), { recursive: true, force: true })
  t0 = performance.now()
  await npmInstall(npmRepo, [again])
  reinstall.npm.push(ms(t0))
  rmSync(join(pnpmRepo, 'node_modules', aliasOf(again)), { recursive: true, force: true })
  t0 = performance.now()
  await pnpmAdd(pnpmRepo, [again])
  reinstall.pnpm.push(ms(t0))
}

// 3. 4 workers installing 4 different adaptors at once (nanokit, one
// running process each, a fresh repo) against npm installing them one after
// another into a fresh shared tree (each npm run starts its own node), and
// 4 bare npm runs at once in 4 directories: the floor of any design that
// runs npm once per adaptor.
const four = fx.specs.slice(2)
// A worker process that is already running (node started, nanokit
// loaded), as OpenFn's workers are when a job needs an adaptor: `go()`
// starts its install and resolves when it is done.
async function worker(repo, spec) {
  const child = spawn(process.execPath, [WORKER, JSON.stringify({ op: 'install', repo, specs: [spec], npmArgs, staleMs: 600000, timeoutMs: 600000, waitForGo: true })], { stdio: ['pipe', 'pipe', 'inherit'] })
  const rl = createInterface({ input: child.stdout })
  let ready
  const isReady = new Promise((r) => (ready = r))
  const done = new Promise((resolve, reject) => {
    rl.on('line', (l) => {
      const e = JSON.parse(l)
      if (e.event === 'ready') ready()
      if (e.event === 'error') reject(new Error(e.message))
    })
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`worker exit ${code}`))))
  })
  await isReady
  return () => {
    child.stdin.end('go\n')
    return done
  }
}
// CPU seconds (user + system) of a command and its children.
async function cpuOf(argv, cwd) {
  const { stderr } = await run('/usr/bin/time', ['-f', 'NKCPU %U %S', ...argv], { cwd })
  const [, u, s] = stderr.match(/NKCPU ([\d.]+) ([\d.]+)/)
  return Number(u) + Number(s)
}
const parallel = { nanokit: [], npm: [], npmCpuS: [], bareNpm: [] }
for (let round = 0; round < 3; round++) {
  const repo = fresh('four')
  const workers = await Promise.all(four.map((spec) => worker(repo, spec)))
  let t0 = performance.now()
  await Promise.all(workers.map((go) => go()))
  parallel.nanokit.push(ms(t0))
  const shared = fresh('four-npm')
  t0 = performance.now()
  let cpu = 0
  for (const spec of four) cpu += await cpuOf(['npm', 'install', '--no-audit', '--no-fund', npmSpec(spec), ...npmArgs], shared)
  parallel.npm.push(ms(t0))
  parallel.npmCpuS.push(cpu)
  t0 = performance.now()
  await Promise.all(four.map((spec) => run('npm', ['install', '--no-audit', '--no-fund', '--no-package-lock', '--no-save', npmSpec(spec), ...npmArgs], { cwd: fresh('bare') })))
  parallel.bareNpm.push(ms(t0))
}

await registry.close()
const mb = (b) => `${(b / 1e6).toFixed(2)} MB`
const r2 = (x) => `${x.toFixed(2)}×`
const rows = [
  ['repo disk, 6 adaptors', mb(nkDisk), `npm ${mb(npmDisk)}, pnpm ${mb(pnpmDisk)}`, `${r2(nkDisk / npmDisk)} npm, ${r2(nkDisk / pnpmDisk)} pnpm`, '≤ 0.9× npm (moonshot ≤ pnpm)'],
  [
    'reinstall, all files in the store (median of 3)',
    `${median(reinstall.nanokit).toFixed(0)} ms`,
    `npm ${median(reinstall.npm).toFixed(0)} ms, pnpm ${median(reinstall.pnpm).toFixed(0)} ms`,
    `${r2(median(reinstall.nanokit) / median(reinstall.npm))} npm, ${r2(median(reinstall.nanokit) / median(reinstall.pnpm))} pnpm`,
    '≤ 1.0× npm (moonshot 0.5×)',
  ],
  [
    '4 adaptors: 4 workers at once vs npm one after another (median of 3)',
    `${median(parallel.nanokit).toFixed(0)} ms`,
    `npm ${median(parallel.npm).toFixed(0)} ms`,
    r2(median(parallel.nanokit) / median(parallel.npm)),
    '≤ 0.6×',
  ],
  [
    '… 4 bare npm runs at once, 4 directories (the floor of one npm per adaptor)',
    '',
    `${median(parallel.bareNpm).toFixed(0)} ms`,
    r2(median(parallel.bareNpm) / median(parallel.npm)),
    '',
  ],
  [
    '… npm\'s own CPU time for the 4 sequential installs ÷ cores',
    '',
    `${(median(parallel.npmCpuS) * 1000).toFixed(0)} CPU-ms ÷ ${cores}`,
    r2((median(parallel.npmCpuS) * 1000) / cores / median(parallel.npm)),
    '',
  ],
]
console.log(`\nload average at the start: ${loadAtStart}; at the end: ${loadavg().map((l) => l.toFixed(2)).join(' ')}`)
console.log(`fixtures: 6 adaptors (${fx.specs.join(', ')}), 4 shared libraries (two versions of the common one); offline registry; ${process.env.NANOKIT_MAX_CONCURRENT_INSTALLS ?? 'default'} installers at once per host (cores: ${cores})`)
console.log(`sharing ratio: ${status.store.sharingRatio.toFixed(2)} (${mb(status.store.packageBytes)} of package files in ${mb(status.store.diskBytes)} on disk; store ${status.store.files} files)`)
console.log('| measurement | nanokit | anchors | ratio | target |')
console.log('|---|---|---|---|---|')
for (const r of rows) console.log(`| ${r.join(' | ')} |`)
console.log(`\nraw: reinstall ${JSON.stringify(reinstall)}; parallel ${JSON.stringify(parallel)}`)
rmSync(work, { recursive: true, force: true })
