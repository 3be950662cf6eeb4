// A worker process for the repo kill/invariant tests. argv[2] is a JSON
// command; events are JSON lines on stdout. nanokit's test hook
// NANOKIT_TEST_PAUSE_AT (in the environment) pauses a commit for a kill.
import { mkdirSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join } from 'node:path'

const require = createRequire(import.meta.url)
const nk = require('../../nanokit.js')

const cmd = JSON.parse(process.argv[2])
const emit = (event) => process.stdout.write(JSON.stringify({ pid: process.pid, t: Date.now(), ...event }) + '\n')

/** The files of a package made by `fileInstaller(count)` (repo-invariants.spec.mjs has the same list). */
function packageFiles(count) {
  return ['package.json', ...Array.from({ length: count }, (_, i) => `f${String(i).padStart(4, '0')}.js`)]
}

/** An installer that does not wait: writes `count` files and package.json at once. */
function fileInstaller(count) {
  return async (specifier, dir) => {
    const at = specifier.lastIndexOf('@')
    const [name, version] = [specifier.slice(0, at), specifier.slice(at + 1)]
    const pkg = join(dir, 'node_modules', `${name}_${version}`)
    mkdirSync(pkg, { recursive: true })
    for (const f of packageFiles(count).slice(1)) writeFileSync(join(pkg, f), `module.exports = ${JSON.stringify(f)}\n`)
    writeFileSync(join(pkg, 'package.json'), JSON.stringify({ name, version, main: 'f0000.js' }))
    emit({ event: 'installing', spec: specifier, dir })
  }
}

async function main() {
  if (cmd.op !== 'install') throw new Error(`unknown op ${cmd.op}`)
  const options = { staleMs: cmd.staleMs ?? 120000, timeoutMs: cmd.timeoutMs ?? 60000 }
  if (cmd.files != null) options.install = fileInstaller(cmd.files)
  if (cmd.npmArgs) options.npmArgs = cmd.npmArgs
  Object.assign(options, cmd.options)
  if (cmd.waitForGo) {
    // Started and loaded beforehand, like a worker that already runs: go on
    // the first line on stdin.
    emit({ event: 'ready' })
    await new Promise((resolve) => process.stdin.once('data', resolve))
    process.stdin.pause()
  }
  emit({ event: 'start' })
  for (const spec of cmd.specs) {
    try {
      const result = await nk.install(cmd.repo, spec, options)
      emit({ event: 'done', spec, result, installed: nk.isInstalled(cmd.repo, spec) })
    } catch (e) {
      emit({ event: 'error', spec, code: e.code, message: e.message })
      process.exitCode = 3
    }
  }
  emit({ event: 'finished' })
}

main().catch((e) => {
  emit({ event: 'crash', message: e.stack, code: e.code })
  process.exitCode = 2
})
