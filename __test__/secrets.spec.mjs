// Secrets from `.env` and from `vars` (the JS stand-in for the environment)
// never reach JS unmasked: not in `onEvent` messages, not in a rejection,
// not in `loadConfig`, `plan`, `status` or `drift` results; and the real
// `npx nanokit` CLI prints none of them either. Every file under .nanokit
// is 0600 and every folder 0700, and none holds a secret.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { lstatSync, mkdtempSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'

const require = createRequire(import.meta.url)
const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const nk = require(join(root, 'nanokit.js'))
const BIN = join(root, 'bin', 'nanokit.js')

const DOTENV = 'dotenv-Secret-5531'
const VAR = 'var-Secret-7782'

const YML = `name: jssecrets
services:
  a:
    start: "exec sleep 600"
    env:
      URL: "http://u:\${DOTENV_PASS}@127.0.0.1/x"
    hooks:
      prestart: "echo pre \${DOTENV_PASS} \${JS_VAR}"
  b:
    start: "TOKEN=\${JS_VAR} exec sleep 600"
    depends_on: [a]
    hooks:
      poststart: "echo failing with \${DOTENV_PASS}; exit 5"
`

function walk(dir, out = []) {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name)
    out.push(p)
    if (lstatSync(p).isDirectory()) walk(p, out)
  }
  return out
}

function checkWorkDir(dir, after) {
  const work = join(dir, '.nanokit')
  for (const p of [work, ...walk(work)]) {
    const st = lstatSync(p)
    const mode = st.mode & 0o777
    if (st.isDirectory()) {
      assert.equal(mode, 0o700, `after ${after}: folder ${p} is ${mode.toString(8)}`)
    } else {
      assert.equal(mode, 0o600, `after ${after}: file ${p} is ${mode.toString(8)}`)
      const text = readFileSync(p, 'utf8')
      for (const s of [DOTENV, VAR]) assert.ok(!text.includes(s), `after ${after}: ${p} holds ${s}`)
    }
  }
}

function clean(what, text) {
  for (const s of [DOTENV, VAR]) assert.ok(!text.includes(s), `${what} shows ${s}:\n${text}`)
}

test('JS API and the npx CLI: onEvent, rejections and results are masked; .nanokit is private', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'nk-secrets-'))
  const file = join(dir, 'nanokit.yml')
  writeFileSync(file, YML)
  writeFileSync(join(dir, '.env'), `DOTENV_PASS=${DOTENV}\n`)
  const opts = { file, vars: { JS_VAR: VAR } }

  const cfg = await nk.loadConfig(opts)
  clean('loadConfig', JSON.stringify(cfg))
  assert.equal(cfg.services.find((s) => s.name === 'b').start, 'TOKEN=*** exec sleep 600')

  const plan = await nk.plan(opts)
  clean('plan', JSON.stringify(plan))
  checkWorkDir(dir, 'plan')

  const events = []
  const err = await nk.up({ ...opts, onEvent: (e) => events.push(e) }).then(
    () => assert.fail('up should fail: b’s poststart exits 5'),
    (e) => e,
  )
  assert.equal(err.code, 'ENKFAILED')
  clean('the rejection', `${err.message} ${JSON.stringify(err)}`)
  assert.match(err.message, /echo failing with \*\*\*; exit 5/)
  clean('onEvent', JSON.stringify(events))
  assert.ok(
    events.some((e) => e.phase === 'hook' && e.message === 'prestart: echo pre *** ***'),
    JSON.stringify(events),
  )
  assert.ok(events.some((e) => e.phase === 'failed' && /failing with \*\*\*/.test(e.message)))
  checkWorkDir(dir, 'up')

  const status = await nk.status(opts)
  clean('status', JSON.stringify(status))
  assert.match(status.find((s) => s.service === 'b').error, /failing with \*\*\*/)
  clean('drift', JSON.stringify(await nk.drift(opts)))

  // The real command line (`npx nanokit`), with JS_VAR from its environment.
  const env = { ...process.env, JS_VAR: VAR }
  for (const args of [['status'], ['plan'], ['drift'], ['timeline'], ['up'], ['down']]) {
    const r = spawnSync(process.execPath, [BIN, ...args, '-f', file], { encoding: 'utf8', env })
    clean(`nanokit ${args.join(' ')}`, r.stdout + r.stderr)
    checkWorkDir(dir, `nanokit ${args.join(' ')}`)
  }
  await nk.down(opts)
  checkWorkDir(dir, 'down')
})
