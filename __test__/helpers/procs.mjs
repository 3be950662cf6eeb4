// Child processes for the repo kill/invariant tests (stdout JSON events and
// stderr lines both captured), and a /proc scan for processes still working
// inside a directory.
import { spawn } from 'node:child_process'
import { readFileSync, readdirSync, readlinkSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

const live = new Set()

/** SIGKILLs every process started here that still runs (afterEach). */
export function killStarted() {
  for (const child of live) child.kill('SIGKILL')
  live.clear()
}

/** Starts `node helpers/<script> <json>`; see the returned methods. */
export function start(script, command, { env, uid, gid, cwd, wrap = [] } = {}) {
  const file = fileURLToPath(new URL(`./${script}`, import.meta.url))
  // `wrap` runs it through another command first (e.g. unshare …).
  const argv = [...wrap, process.execPath, file, JSON.stringify(command)]
  const child = spawn(argv[0], argv.slice(1), {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
    uid,
    gid,
    cwd,
  })
  live.add(child)
  const events = []
  const stderr = []
  const waiters = []
  const offer = () => {
    for (const w of [...waiters]) {
      const hit = w.pool().find(w.pred)
      if (hit) {
        waiters.splice(waiters.indexOf(w), 1)
        w.resolve(hit)
      }
    }
  }
  createInterface({ input: child.stdout }).on('line', (line) => {
    try {
      events.push(JSON.parse(line))
    } catch {
      return
    }
    offer()
  })
  createInterface({ input: child.stderr }).on('line', (line) => {
    stderr.push(line)
    if (process.env.NK_TEST_VERBOSE) process.stderr.write(`[${child.pid}] ${line}\n`)
    offer()
  })
  const exited = new Promise((resolve) =>
    child.on('exit', (code, signal) => {
      live.delete(child)
      resolve({ code, signal })
    }),
  )
  const wait = (pool, pred, what) =>
    new Promise((resolve, reject) => {
      const hit = pool().find(pred)
      if (hit) return resolve(hit)
      waiters.push({ pool, pred, resolve })
      exited.then(({ code, signal }) =>
        setTimeout(() => {
          const late = pool().find(pred)
          if (late) resolve(late)
          else reject(new Error(`process ${child.pid} exited (${code ?? signal}) before ${what}; events ${JSON.stringify(events)}; stderr ${stderr.slice(-20).join('\n')}`))
        }, 50),
      )
    })
  return {
    child,
    events,
    stderr,
    exited,
    send: (line) => child.stdin.write(line + '\n'),
    /** The first event (past or future) matching `pred`. */
    next: (pred) => wait(() => events, pred, 'the awaited event'),
    /** The first stderr line (past or future) matching `re`. */
    line: (re) => wait(() => stderr, (l) => re.test(l), `a stderr line matching ${re}`),
    async kill() {
      child.kill('SIGKILL')
      return exited
    },
  }
}

/**
 * Processes (other than this one) whose working directory is inside `dir` or
 * whose command line mentions it, as `{ pid, cmdline }`, except `exclude`d pids.
 */
export function processesIn(dir, exclude = []) {
  const out = []
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid || exclude.includes(Number(name))) continue
    let cwd = ''
    let cmdline = ''
    let state = ''
    try {
      state = readFileSync(`/proc/${name}/stat`, 'utf8').replace(/^.*\) /s, '')[0]
      cmdline = readFileSync(`/proc/${name}/cmdline`, 'utf8').replaceAll('\0', ' ')
      cwd = readlinkSync(`/proc/${name}/cwd`)
    } catch {
      // gone, or not ours to read
    }
    if (state === 'Z' || state === 'X' || state === '') continue
    if (cwd === dir || cwd.startsWith(dir + '/') || cmdline.includes(dir)) out.push({ pid: Number(name), cwd, cmdline })
  }
  return out
}

/** Polls until `f()` is truthy or `ms` passed; returns the last value. */
export async function eventually(f, ms, step = 25) {
  const deadline = Date.now() + ms
  let v = f()
  while (!v && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, step))
    v = f()
  }
  return v
}
