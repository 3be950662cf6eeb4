// A child process for the multi-process tests. argv[2] is a JSON command;
// events are printed as JSON lines on stdout.
import { appendFileSync, mkdirSync, openSync, closeSync, unlinkSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { setTimeout as sleep } from 'node:timers/promises'

const require = createRequire(import.meta.url)
const nk = require('../../nanokit.js')

const cmd = JSON.parse(process.argv[2])
const emit = (event) => process.stdout.write(JSON.stringify({ pid: process.pid, t: Date.now(), ...event }) + '\n')

/** An installer that writes the package slowly, file by file, marking completeness last. */
function slowInstaller({ sleepMs = 0, counter, fail } = {}) {
  return async (specifier, dir) => {
    const at = specifier.lastIndexOf('@')
    const [name, version] = [specifier.slice(0, at), specifier.slice(at + 1)]
    if (counter) appendFileSync(counter, `${process.pid}\n`)
    emit({ event: 'installing', dir })
    if (fail) {
      const e = new Error(`custom installer failed: ${fail}`)
      e.code = 'EBOOM'
      throw e
    }
    const pkg = join(dir, 'node_modules', `${name}_${version}`)
    mkdirSync(pkg, { recursive: true })
    writeFileSync(join(pkg, 'package.json'), JSON.stringify({ name, version, main: 'index.js' }))
    await sleep(sleepMs / 2)
    writeFileSync(join(pkg, 'index.js'), `module.exports = ${JSON.stringify(specifier)}\n`)
    await sleep(sleepMs / 2)
    writeFileSync(join(pkg, 'complete.txt'), 'yes')
  }
}

async function main() {
  switch (cmd.op) {
    case 'install': {
      const options = { staleMs: cmd.staleMs ?? 30000 }
      if (cmd.custom) options.install = slowInstaller(cmd.custom)
      if (cmd.npmArgs) options.npmArgs = cmd.npmArgs
      emit({ event: 'start' })
      try {
        const handlers = nk.createLockedHandlers(cmd.repo, options)
        const start = Date.now()
        if (cmd.viaHandlers) {
          await handlers.handleInstall(cmd.spec, cmd.repo, console)
          emit({ event: 'done', result: { installed: null }, installed: await handlers.handleIsInstalled(cmd.spec, cmd.repo), start })
        } else {
          const result = await nk.install(cmd.repo, cmd.spec, options)
          emit({ event: 'done', result, installed: nk.isInstalled(cmd.repo, cmd.spec), start })
        }
      } catch (e) {
        emit({ event: 'error', code: e.code, message: e.message })
        process.exitCode = 3
      }
      break
    }
    case 'hold': {
      const handle = await nk.acquireLock(cmd.path, { staleMs: cmd.staleMs, holder: cmd.holder })
      emit({ event: 'acquired', token: handle.token })
      if (cmd.releaseAfterMs != null) {
        await sleep(cmd.releaseAfterMs)
        handle.release()
        emit({ event: 'released' })
      } else {
        setInterval(() => {}, 1 << 30) // hold until killed
      }
      break
    }
    case 'race': {
      // Rounds driven by the parent over stdin: "go N staleMs" → try to take
      // the (stale) lock, until we win or "stop N" aborts the attempt;
      // "release" → release what we hold, reporting whether the lease had
      // been lost (taken over) meanwhile.
      let held = null
      let attempt = null
      const rl = createInterface({ input: process.stdin })
      emit({ event: 'ready' })
      for await (const line of rl) {
        const [verb, arg, staleMs] = line.split(' ')
        if (verb === 'go') {
          const round = Number(arg)
          const abort = new AbortController()
          attempt = { round, abort }
          nk.acquireLock(cmd.path, { staleMs: Number(staleMs), timeoutMs: 120_000, signal: abort.signal }).then(
            (h) => {
              held = h
              emit({ event: 'round', round, won: true })
            },
            (e) => {
              if (e.code !== 'ENKABORTED') {
                emit({ event: 'crash', message: e.stack, code: e.code })
                process.exit(1)
              }
              emit({ event: 'round', round, won: false })
            },
          )
        } else if (verb === 'stop') {
          if (attempt?.round === Number(arg)) attempt.abort.abort()
        } else if (verb === 'release') {
          let lost = false
          try {
            held?.release()
          } catch (e) {
            if (e.code !== 'ENKLOCKLOST') throw e
            lost = true
          }
          held = null
          emit({ event: 'released', lost })
        } else if (verb === 'quit') {
          break
        }
      }
      rl.close()
      break
    }
    case 'cycles': {
      let overlaps = 0
      const marker = cmd.marker
      for (let i = 0; i < cmd.cycles; i++) {
        const h = await nk.acquireLock(cmd.path, { staleMs: 10000 })
        try {
          closeSync(openSync(marker, 'wx')) // fails if someone else is inside
        } catch {
          overlaps++
        }
        appendFileSync(cmd.log, `${process.pid} ${i}\n`)
        if (Math.random() < 0.5) await sleep(0)
        try {
          unlinkSync(marker)
        } catch {}
        h.release()
      }
      emit({ event: 'done', overlaps })
      break
    }
    case 'lock-and-exit': {
      const h = await nk.acquireLock(cmd.path, { staleMs: 200 })
      if (cmd.release) h.release()
      emit({ event: 'done' })
      break // the event loop must now be empty; the process must exit
    }
    case 'handlers-and-exit': {
      const { handleInstall, handleIsInstalled } = nk.createLockedHandlers(cmd.repo, {
        install: slowInstaller({ sleepMs: 10 }),
        staleMs: 200,
      })
      await handleInstall(cmd.spec, cmd.repo, undefined)
      emit({ event: 'done', installed: await handleIsInstalled(cmd.spec, cmd.repo) })
      break
    }
    case 'provision': {
      try {
        const r = await nk.provision(cmd.dir, { command: cmd.command, manifests: cmd.manifests, staleMs: cmd.staleMs })
        emit({ event: 'done', result: r })
      } catch (e) {
        emit({ event: 'error', code: e.code, message: e.message })
      }
      break
    }
    default:
      throw new Error(`unknown op ${cmd.op}`)
  }
}

main().catch((e) => {
  emit({ event: 'crash', message: e.stack, code: e.code })
  process.exitCode = 2
})
