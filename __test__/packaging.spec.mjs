// The package as a consumer gets it: `npm pack` of the main package and of
// the linux-x64-gnu platform package (filled by `napi artifacts`), installed
// into a fresh project with cargo and rustc off PATH and npm offline. Then:
// the public API, `npx nanokit` / `npx nkapp`, a lock, an install through
// createLockedHandlers from the fixture registry; and the glibc floor (2.17)
// of the shipped `.node` and of the standalone binary.
import assert from 'node:assert/strict'
import { execFile, execFileSync, spawnSync } from 'node:child_process'
import { copyFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'
import { promisify } from 'node:util'
import { after, before, describe, it } from 'node:test'

import { startRegistry } from './helpers/registry.mjs'
import { standaloneBinaryPath } from '../scripts/build.mjs'

const root = join(import.meta.dirname, '..')
const require = createRequire(import.meta.url)
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
const PLATFORM = 'linux-x64-gnu'
const PLATFORM_PKG = `${pkg.name}-${PLATFORM}`
const ADDON = `${pkg.napi.binaryName}.${PLATFORM}.node`
const GLIBC_FLOOR = [2, 17]

const work = mkdtempSync(join(tmpdir(), 'nk-packaging-'))
const run = promisify(execFile)

/** PATH without any directory that holds cargo or rustc. */
function pathWithoutRust() {
  const dirs = (process.env.PATH || '').split(delimiter).filter((d) => d && !['cargo', 'rustc'].some((t) => existsSync(join(d, t))))
  return dirs.join(delimiter)
}

/** Environment of the consumer: no Rust, npm offline with a private cache, no config of ours. */
function consumerEnv(extra = {}) {
  const env = { ...process.env, PATH: pathWithoutRust(), npm_config_offline: 'true', npm_config_cache: join(work, 'npm-cache'), ...extra }
  for (const k of Object.keys(env)) if (/^(CARGO|RUSTUP|RUSTC)/.test(k) || k === 'npm_package_json' || k === 'INIT_CWD') delete env[k]
  return env
}

/** `npm pack --json` of `dir` into the work dir; returns { file, files }. */
function npmPack(dir) {
  const out = execFileSync('npm', ['pack', '--json', '--pack-destination', work], { cwd: dir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
  const [info] = JSON.parse(out)
  return { file: join(work, info.filename), files: info.files.map((f) => f.path).sort() }
}

function npmInstall(project, args = []) {
  return execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', ...args], {
    cwd: project,
    env: consumerEnv(),
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
  })
}

/**
 * Undefined dynamic symbols of an ELF file above the glibc floor, and strong
 * ones without any version that `allowUnversioned` does not accept.
 */
export function glibcViolations(file, allowUnversioned = () => false) {
  const out = execFileSync('objdump', ['-T', file], { encoding: 'utf8', maxBuffer: 64 << 20 })
  const tooNew = []
  const unversioned = []
  let newest = [0, 0]
  for (const line of out.split('\n')) {
    if (!line.includes('*UND*')) continue
    // <addr> <flags> *UND* <size> [(VERSION) | VERSION] <name>
    const m = line.match(/^\S+\s+(.{7})\s*\*UND\*\s+\S+\s+(?:\(?([A-Za-z_][\w.]*?)\)?\s+)?(\S+)$/)
    if (!m) continue
    const [, flags, version, name] = m
    const weak = flags.includes('w')
    const g = version?.match(/^GLIBC_(\d+)\.(\d+)/)
    if (g) {
      const v = [Number(g[1]), Number(g[2])]
      if (v[0] > newest[0] || (v[0] === newest[0] && v[1] > newest[1])) newest = v
      if (v[0] > GLIBC_FLOOR[0] || (v[0] === GLIBC_FLOOR[0] && v[1] > GLIBC_FLOOR[1])) tooNew.push(`${name}@${version}`)
    } else if (!version && !weak && !allowUnversioned(name)) {
      unversioned.push(name)
    }
  }
  return { tooNew, unversioned, newest: `GLIBC_${newest.join('.')}` }
}

const nodeApi = (name) => /^(napi_|node_api_|uv_)/.test(name)

let registry
/** What `npm run artifacts` printed, first and second run. */
const artifactsRuns = []
let mainTgz
let platformTgz
let consumer

before(async () => {
  const addon = join(root, ADDON)
  assert.ok(existsSync(addon), `${ADDON} is not built; run \`npm run build\` first`)

  // The platform package as `napi create-npm-dirs` wrote it, filled by `napi artifacts`.
  const stage = join(work, 'stage')
  mkdirSync(join(stage, 'artifacts'), { recursive: true })
  cpSync(join(root, 'npm'), join(stage, 'npm'), { recursive: true })
  copyFileSync(join(root, 'package.json'), join(stage, 'package.json'))
  copyFileSync(addon, join(stage, 'artifacts', ADDON))
  // `npm run artifacts` (napi artifacts, reporting what it changed), twice:
  // the second run changes nothing and says so.
  const r = spawnSync(process.execPath, [join(root, 'scripts', 'artifacts.mjs'), '--cwd', stage, '--output-dir', 'artifacts'], { encoding: 'utf8' })
  assert.equal(r.status, 0, r.stderr)
  artifactsRuns.push(r.stderr)
  artifactsRuns.push(spawnSync(process.execPath, [join(root, 'scripts', 'artifacts.mjs'), '--cwd', stage, '--output-dir', 'artifacts'], { encoding: 'utf8' }).stderr)
  mainTgz = npmPack(root)
  platformTgz = npmPack(join(stage, 'npm', PLATFORM))

  // The fixtures, and the platform package (for the command the loader
  // prints when it is missing).
  registry = await startRegistry({ extra: [{ tarball: platformTgz.file }] })

  // A consumer that depends on the main package only: the platform package
  // comes in through its optionalDependencies (pointed at the tarball).
  consumer = join(work, 'consumer')
  mkdirSync(consumer)
  writeFileSync(
    join(consumer, 'package.json'),
    JSON.stringify({
      name: 'consumer',
      version: '1.0.0',
      private: true,
      dependencies: { [pkg.name]: `file:${mainTgz.file}` },
      overrides: { [PLATFORM_PKG]: `file:${platformTgz.file}` },
    }),
  )
  npmInstall(consumer)
})

after(async () => {
  await registry?.close()
})

describe('packaging: what npm pack ships', () => {
  it('the main package ships only the JS layer, its typings, the CLI shim, README and LICENSE', () => {
    assert.deepEqual(mainTgz.files, [
      'LICENSE',
      'README.md',
      'bin/nanokit.js',
      'binding.js',
      'errors.js',
      'index.d.ts',
      'index.js',
      'kv-wrapper.d.ts',
      'kv-wrapper.js',
      'nanokit.d.ts',
      'nanokit.js',
      'package.json',
    ])
  })

  it('the main package depends optionally on every platform package, at its own version, and has no install script', () => {
    const manifest = JSON.parse(execFileSync('tar', ['-xOzf', mainTgz.file, 'package/package.json'], { encoding: 'utf8' }))
    const npmDirs = readdirSync(join(root, 'npm')).sort()
    assert.deepEqual(Object.keys(manifest.optionalDependencies).sort(), npmDirs.map((d) => `${pkg.name}-${d}`))
    for (const v of Object.values(manifest.optionalDependencies)) assert.equal(v, manifest.version)
    for (const s of ['preinstall', 'install', 'postinstall', 'prepare']) assert.equal(manifest.scripts?.[s], undefined, `scripts.${s}`)
    assert.deepEqual(manifest.bin, { nanokit: 'bin/nanokit.js', nkapp: 'bin/nanokit.js' })
    assert.ok(manifest.repository?.url, 'repository')
    assert.equal(manifest.license, 'MIT')
  })

  it('the platform package holds only its .node, README and LICENSE, and declares os, cpu and libc', () => {
    assert.deepEqual(platformTgz.files, ['LICENSE', 'README.md', ADDON, 'package.json'].sort())
    const license = execFileSync('tar', ['-xOzf', platformTgz.file, 'package/LICENSE'], { encoding: 'utf8' })
    assert.equal(license, readFileSync(join(root, 'LICENSE'), 'utf8'), 'npm/*/LICENSE is a copy of LICENSE')
    const manifest = JSON.parse(execFileSync('tar', ['-xOzf', platformTgz.file, 'package/package.json'], { encoding: 'utf8' }))
    assert.equal(manifest.name, PLATFORM_PKG)
    assert.equal(manifest.version, pkg.version)
    assert.deepEqual([manifest.os, manifest.cpu, manifest.libc], [['linux'], ['x64'], ['glibc']])
    assert.equal(manifest.main, ADDON)
  })
})

describe('packaging: npm run artifacts', () => {
  it('says which files it wrote and which it left unchanged, not `Write [x] to [x]` for each', () => {
    const [first, second] = artifactsRuns
    assert.doesNotMatch(first + second, /Write \[/)
    assert.match(first, new RegExp(`^wrote +npm/${PLATFORM}/${ADDON.replaceAll('.', '\\.')} \\(from artifacts/`, 'm'))
    const lines = second.trim().split('\n')
    assert.ok(lines.length >= 2, second)
    for (const l of lines) assert.match(l, /^unchanged /, second)
  })
})

describe('packaging: installed in a fresh project, without Rust, offline', () => {
  const node = (script, env = {}) =>
    run(process.execPath, ['-e', script], { cwd: consumer, env: consumerEnv(env), encoding: 'utf8' }).then((r) => r.stdout)
  const npx = (...args) => run('npx', ['--offline', '--no-install', ...args], { cwd: consumer, env: consumerEnv(), encoding: 'utf8' })

  it('neither cargo nor rustc is reachable in the consumer', () => {
    for (const tool of ['cargo', 'rustc']) {
      assert.throws(() => execFileSync('sh', ['-c', `command -v ${tool}`], { env: consumerEnv(), stdio: 'pipe' }), `${tool} found on the consumer's PATH`)
    }
  })

  it('the binding loads from the installed platform package', () => {
    const mod = join(consumer, 'node_modules', pkg.name)
    assert.deepEqual(readdirSync(mod).filter((f) => f.endsWith('.node')), [], 'no .node in the main package')
    assert.ok(existsSync(join(consumer, 'node_modules', PLATFORM_PKG, ADDON)))
    assert.ok(!existsSync(join(mod, 'target')) && !existsSync(join(mod, 'Cargo.toml')), 'nothing was built')
  })

  it(`require('${pkg.name}') exposes the public API`, async () => {
    const keys = JSON.parse(await node(`const nk = require(${JSON.stringify(pkg.name)}); console.log(JSON.stringify(Object.keys(nk).sort()))`))
    assert.deepEqual(keys, Object.keys(require('../nanokit.js')).sort())
    for (const name of ['createLockedHandlers', 'acquireLock', 'withLock', 'openState', 'up', 'plan', 'cli']) assert.ok(keys.includes(name), name)
  })

  it('npx nanokit --help and npx nkapp --version work', async () => {
    const help = await npx('nanokit', '--help')
    assert.match(help.stdout, /Usage: nanokit/)
    const version = await npx('nkapp', '--version')
    // The alias names itself, as the standalone `nkapp` does (cli.spec).
    assert.equal(version.stdout.trim(), `nkapp ${pkg.version}`)
  })

  it('a lock can be taken and released', async () => {
    const out = await node(`
      const nk = require(${JSON.stringify(pkg.name)})
      const path = require('path').join(${JSON.stringify(work)}, 'a.lock')
      ;(async () => {
        const lock = await nk.acquireLock(path, { holder: 'packaging test' })
        const held = nk.inspectLock(path)
        const second = nk.tryAcquireLock(path)
        lock.release()
        const again = nk.tryAcquireLock(path)
        again.release()
        console.log(JSON.stringify({ heldBy: held.holder && held.holder.pid, second, again: !!again }))
      })().catch((e) => { console.error(e); process.exit(1) })`)
    const r = JSON.parse(out)
    assert.equal(typeof r.heldBy, 'number', 'inspectLock names the holder while held')
    assert.equal(r.second, null, 'a second tryAcquireLock while held must fail')
    assert.equal(r.again, true, 'free again after release')
  })

  it('a package from the fixture registry installs through createLockedHandlers', async () => {
    const repo = join(work, 'repo')
    const out = await node(`
      const nk = require(${JSON.stringify(pkg.name)})
      const repo = ${JSON.stringify(repo)}
      const h = nk.createLockedHandlers(repo, { npmArgs: ${JSON.stringify(registry.npmArgs)} })
      ;(async () => {
        const before = await h.handleIsInstalled('nk-fixture-a@1.0.0', repo)
        await h.handleInstall('nk-fixture-a@1.0.0', repo)
        const afterwards = await h.handleIsInstalled('nk-fixture-a@1.0.0', repo)
        const value = require(require('path').join(repo, 'node_modules', 'nk-fixture-a_1.0.0'))
        console.log(JSON.stringify({ before, afterwards, value }))
      })().catch((e) => { console.error(e); process.exit(1) })`, { npm_config_offline: 'false' })
    assert.deepEqual(JSON.parse(out), { before: false, afterwards: true, value: 'a:dep@1.0.0' })
  })

  /** `require` of the main package in `dir`: { code, first } of its error (null when it loads). */
  const requireIn = (dir) => {
    const script = `try { require(${JSON.stringify(pkg.name)}) } catch (e) { console.log(JSON.stringify({ code: e.code, first: e.message.split('\\n')[0] })); process.exit(3) }`
    try {
      execFileSync(process.execPath, ['-e', script], { cwd: dir, env: consumerEnv(), stdio: 'pipe', encoding: 'utf8' })
      return null
    } catch (e) {
      assert.equal(e.status, 3, e.stderr)
      return JSON.parse(e.stdout)
    }
  }
  /** A fresh project with the main package alone (offline: the optional platform package is skipped). */
  const bareProject = (name) => {
    const dir = join(work, name)
    mkdirSync(dir)
    writeFileSync(join(dir, 'package.json'), JSON.stringify({ name, version: '1.0.0', private: true, dependencies: { [pkg.name]: `file:${mainTgz.file}` } }))
    npmInstall(dir)
    assert.ok(!existsSync(join(dir, 'node_modules', PLATFORM_PKG)))
    return dir
  }
  const glibc = process.report.getReport().header.glibcVersionRuntime

  it('without its platform package, require throws one error whose first line names the package, the platform and libc, and the command that installs it, which works', async () => {
    const bare = bareProject('bare')
    const err = requireIn(bare)
    assert.ok(err, 'require succeeded without a platform package')
    assert.equal(err.code, 'ENKBINDING')
    const command = `npm install ${PLATFORM_PKG}@${pkg.version}`
    for (const part of [PLATFORM_PKG, `linux x64 glibc ${glibc}`, `\`${command}\``]) assert.ok(err.first.includes(part), `${part} not in: ${err.first}`)
    // The command says so too, in one line, and fails.
    const cmd = (() => {
      try {
        execFileSync('npx', ['--offline', '--no-install', 'nanokit', '--help'], { cwd: bare, env: consumerEnv(), stdio: 'pipe', encoding: 'utf8' })
        return null
      } catch (e) {
        return e
      }
    })()
    assert.ok(cmd, 'npx nanokit succeeded without a platform package')
    assert.equal(cmd.status, 1)
    assert.equal(cmd.stderr.trim().split('\n')[0], `nanokit: error[ENKBINDING]: ${err.first}`)
    // The printed command, run as printed (npm pointed at the test registry,
    // which this process serves: not a synchronous call), fixes it.
    await run('sh', ['-c', command], {
      cwd: bare,
      env: consumerEnv({ npm_config_offline: 'false', npm_config_registry: registry.url }),
    })
    assert.equal(requireIn(bare), null, 'still no binding after the printed command')
  })

  it('with a platform package that cannot load, the first line is the loader\'s own reason', () => {
    // As in a container without librt.so.1: the shipped .node with that
    // dependency renamed to a library no system has.
    const broken = bareProject('broken')
    const dest = join(broken, 'node_modules', PLATFORM_PKG)
    mkdirSync(dest)
    copyFileSync(join(consumer, 'node_modules', PLATFORM_PKG, 'package.json'), join(dest, 'package.json'))
    const so = readFileSync(join(consumer, 'node_modules', PLATFORM_PKG, ADDON))
    const needed = Buffer.from('librt.so.1\0')
    assert.equal(so.indexOf(needed), so.lastIndexOf(needed), 'librt.so.1 named once')
    assert.ok(so.indexOf(needed) > 0, 'the addon does not need librt.so.1 (the test premise)')
    Buffer.from('libnk.so.1\0').copy(so, so.indexOf(needed))
    writeFileSync(join(dest, ADDON), so)
    const err = requireIn(broken)
    assert.ok(err, 'a binding that cannot load loaded')
    assert.equal(err.code, 'ENKBINDING')
    assert.match(err.first, /^libnk\.so\.1: cannot open shared object file/)
    assert.ok(err.first.includes(join(dest, ADDON)), err.first)
  })
})

describe('packaging: glibc floor (≤ 2.17, no unversioned imports but Node-API)', () => {
  it(`the shipped ${ADDON}`, () => {
    const shipped = join(consumer, 'node_modules', PLATFORM_PKG, ADDON)
    const v = glibcViolations(shipped, nodeApi)
    assert.deepEqual(v.tooNew, [], `needs a glibc newer than 2.17 (newest ${v.newest}); build with \`npm run build\` (napi-rs cross toolchain), not a native build`)
    assert.deepEqual(v.unversioned, [], 'strong imports without a symbol version (not in the 2.17 sysroot: make the syscall, e.g. through rustix)')
  })

  it('the standalone nanokit binary', (t) => {
    const bin = standaloneBinaryPath()
    if (!existsSync(join(root, 'src', 'bin', 'nanokit.rs'))) {
      console.log('SKIPPED: this tree has no standalone binary target (src/bin/nanokit.rs)')
      return t.skip('no standalone binary target')
    }
    if (!existsSync(bin)) {
      assert.notEqual(process.env.CI, 'true', `${bin} is missing: CI must build it (npm run build:bin)`)
      console.log(`SKIPPED: ${bin} is not built (npm run build:bin)`)
      return t.skip('standalone binary not built')
    }
    const v = glibcViolations(bin)
    assert.deepEqual(v.tooNew, [], `needs a glibc newer than 2.17 (newest ${v.newest}); build it with \`npm run build:bin\``)
    assert.deepEqual(v.unversioned, [], 'strong imports without a symbol version')
  })
})
