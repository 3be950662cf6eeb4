// Spawning workers and reading their JSON-line events.
import { spawn } from 'node:child_process'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

const WORKER = fileURLToPath(new URL('./worker.mjs', import.meta.url))

const live = new Set()

/** Kills every worker still running (call from afterEach so a failed test cannot hang the run). */
export function killAll() {
  for (const child of live) child.kill('SIGKILL')
  live.clear()
}

/** Starts a worker; `events` collects its JSON lines; `next(pred)` waits for one. */
export function worker(command, { env } = {}) {
  const child = spawn(process.execPath, [WORKER, JSON.stringify(command)], {
    stdio: ['pipe', 'pipe', 'inherit'],
    env: { ...process.env, ...env },
  })
  live.add(child)
  child.on('exit', () => live.delete(child))
  const events = []
  const waiters = []
  createInterface({ input: child.stdout }).on('line', (line) => {
    let ev
    try {
      ev = JSON.parse(line)
    } catch {
      return
    }
    events.push(ev)
    for (const w of [...waiters]) {
      if (w.pred(ev)) {
        waiters.splice(waiters.indexOf(w), 1)
        w.resolve(ev)
      }
    }
  })
  // 'close', not 'exit': 'exit' can come before the child's last stdout lines
  // are read (seen under a CPU hog: a worker that printed its events and
  // exited 0 looked as if it had printed nothing).
  const exited = new Promise((resolve) => child.on('close', (code, signal) => resolve({ code, signal })))
  return {
    child,
    events,
    exited,
    send: (line) => child.stdin.write(line + '\n'),
    /** Resolves with the first event (past or future) matching `pred`. */
    next(pred) {
      const seen = events.find(pred)
      if (seen) return Promise.resolve(seen)
      return new Promise((resolve, reject) => {
        waiters.push({ pred, resolve })
        exited.then(({ code, signal }) => {
          setImmediate(() => {
            const late = events.find(pred)
            if (late) resolve(late)
            else reject(new Error(`worker ${child.pid} exited (${code ?? signal}) before the awaited event; events: ${JSON.stringify(events)}`))
          })
        })
      })
    },
  }
}

export const ev = (name) => (e) => e.event === name
