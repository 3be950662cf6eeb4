// Every command nanokit prints as a hint works when pasted into the same
// shell: run from the directory the first command ran in, with `-f`
// pointing elsewhere, for both CLIs. The hints: the trace's `see
// \`nanokit timeline …\``, status's `run \`nanokit up\``, and the deploy
// lock's `\`nanokit infra unlock\`` (which then asks, as it should, and
// without a terminal refuses naming the lock it found).
import { spawn, spawnSync } from 'node:child_process'
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { CLIS } from './helpers/clis.mjs'

/** The environment of a user's shell: none of npm's variables (this may run under `npm test`). */
function shellEnv() {
  const env = { ...process.env, NANOKIT_TRACE: '' }
  for (const k of Object.keys(env)) if (k.startsWith('npm_') || k === 'NANOKIT_FILE' || k === 'NANOKIT_ENV') delete env[k]
  delete env.NANOKIT_TRACE
  return env
}

/** The commands in `text` that nanokit printed as hints (between backticks, starting with the program). */
function hints(text, c) {
  return [...text.matchAll(/`([^`]+)`/g)].map((m) => m[1]).filter((h) => h.includes(c.pre[0] || c.cmd))
}

/** Runs `command` as a shell would, in `cwd`. */
function paste(command, cwd) {
  return spawnSync('sh', ['-c', command], { cwd, env: shellEnv(), encoding: 'utf8' })
}

for (const c of CLIS)
  test(`${c.name} CLI: the commands printed as hints work as printed, from where the command ran`, async () => {
    const root = mkdtempSync(join(tmpdir(), 'nk-hints-'))
    const here = join(root, 'here')
    const there = join(root, 'some project')
    mkdirSync(here)
    mkdirSync(there)
    const file = join(there, 'nanokit.yml')
    const name = `hints${process.pid}${c.name}`
    writeFileSync(file, `name: ${name}\nservices:\n  a:\n    start: "exec sleep 600"\n    hooks:\n      prestart: "touch prestart.ran; sleep $\${HOLD:-0}"\n`)
    const rel = join('..', 'some project', 'nanokit.yml')
    const nk = (args, env = {}) => spawnSync(c.cmd, [...c.pre, ...args], { cwd: here, env: { ...shellEnv(), ...env }, encoding: 'utf8' })
    try {
      // Nothing deployed: `status` says to run `up`; that command deploys.
      let r = nk(['status', '-f', rel])
      assert.equal(r.status, 0, r.stderr)
      let [hint] = hints(r.stdout, c)
      assert.ok(hint && / up\b/.test(hint), r.stdout)
      r = paste(hint, here)
      assert.equal(r.status, 0, `${hint}\n${r.stderr}`)
      assert.match(r.stderr, /^up: 1 service\(s\), 1 changed\.$/m)

      // The trace of that run: `see `… timeline <run>``.
      ;[hint] = hints(r.stderr, c).filter((h) => h.includes(' timeline '))
      assert.ok(hint, r.stderr)
      r = paste(hint, here)
      assert.equal(r.status, 0, `${hint}\n${r.stderr}`)
      assert.match(r.stdout + r.stderr, /nanokit up of hints/)

      // A run that holds the deploy lock (its prestart takes a while), and
      // a second one refused with ENKLOCKED, naming `infra unlock`.
      r = nk(['down', '-f', rel])
      assert.equal(r.status, 0, r.stderr)
      rmSync(join(there, 'prestart.ran'), { force: true })
      const holder = spawn(c.cmd, [...c.pre, 'up', '-f', rel], { cwd: here, env: { ...shellEnv(), HOLD: '5' }, stdio: 'ignore' })
      const exited = new Promise((resolve) => holder.on('exit', resolve))
      // Its prestart runs: it holds the lock.
      for (let i = 0; i < 600 && !existsSync(join(there, 'prestart.ran')); i++) await new Promise((resolve) => setTimeout(resolve, 50))
      const locked = nk(['up', '-f', rel])
      assert.match(locked.stderr, /error\[ENKLOCKED\]/)
      ;[hint] = hints(locked.stderr, c).filter((h) => h.includes(' infra unlock'))
      assert.ok(hint, locked.stderr)
      // Pasted: it found that lock (it shows the holder) and asks before
      // clearing it; without a terminal it refuses.
      r = paste(hint, here)
      assert.equal(r.status, 1, `${hint}\n${r.stdout}${r.stderr}`)
      assert.match(r.stderr, /ENKCONFIRM/)
      assert.match(r.stdout, /The deploy lock of .* is held by /)
      await exited
    } finally {
      nk(['down', '-f', rel])
      rmSync(root, { recursive: true, force: true })
    }
  })
