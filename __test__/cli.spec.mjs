// The two command lines agree: the npm CLI (node bin/nanokit.js → napi
// `cli()`) and the standalone executable (src/bin/nanokit.rs) print the same
// stdout and stderr and exit with the same codes, case by case: --help,
// --version, usage errors, `error[CODE]: …` messages, plan's detailed exit
// codes (0 / 1 / 2) and --output json. Both are also checked against the
// expected text itself, so that they cannot agree on something wrong. The
// `nkapp` alias (a link named nkapp to the JS shim; the `nkapp` executable)
// names itself in --help and --version. Other CLI tests (infra, repo, state,
// timeline) run each case against both CLIs through helpers/clis.mjs.
import { spawn, spawnSync } from 'node:child_process'
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { appendFileSync, closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'

import { CLIS, NPM_BIN, ROOT, STANDALONE_BIN, runSync } from './helpers/clis.mjs'
import { openStateSync } from '../index.js'

const VERSION = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version
const [npm, standalone] = CLIS

// The alias under each CLI: a link named `nkapp` to the JS shim (what npm's
// `bin` entry makes), and a link named `nkapp` to the executable (what
// `cargo install` gives as a second binary of the same main).
const aliasDir = mkdtempSync(join(tmpdir(), 'nk-alias-'))
mkdirSync(join(aliasDir, 'npm'))
mkdirSync(join(aliasDir, 'standalone'))
symlinkSync(NPM_BIN, join(aliasDir, 'npm', 'nkapp'))
symlinkSync(STANDALONE_BIN, join(aliasDir, 'standalone', 'nkapp'))
const ALIASES = [
  { name: 'npm nkapp', cmd: process.execPath, pre: [join(aliasDir, 'npm', 'nkapp')] },
  { name: 'standalone nkapp', cmd: join(aliasDir, 'standalone', 'nkapp'), pre: [] },
]

function project(yml) {
  const dir = mkdtempSync(join(tmpdir(), 'nk-cli-'))
  const file = join(dir, 'nanokit.yml')
  writeFileSync(file, yml)
  return { dir, file }
}

/** Runs `args` with both CLIs; asserts identical status, stdout and stderr;
 * returns the (common) result. `scrub` removes what legitimately differs. */
function same(args, { scrub = (s) => s, ...opts } = {}) {
  const [a, b] = [npm, standalone].map((c) => runSync(c, args, opts))
  for (const r of [a, b]) assert.equal(r.error, undefined, String(r.error))
  const show = (r) => `exit ${r.status}\n--- stdout\n${r.stdout}--- stderr\n${r.stderr}`
  assert.equal(b.signal, null)
  assert.deepEqual(
    { status: b.status, stdout: scrub(b.stdout), stderr: scrub(b.stderr) },
    { status: a.status, stdout: scrub(a.stdout), stderr: scrub(a.stderr) },
    `\`nanokit ${args.join(' ')}\` differs:\n[npm] ${show(a)}\n[standalone] ${show(b)}`,
  )
  return a
}

test('npm and standalone CLI: same --help, subcommand --help and --version', () => {
  let r = same(['--help'])
  assert.equal(r.status, 0)
  assert.match(r.stdout, /^Race-free shared package repositories/)
  assert.match(r.stdout, /Usage: nanokit <COMMAND>/)
  for (const cmd of ['plan', 'up', 'down', 'status', 'drift', 'repo', 'state', 'lock', 'timeline', 'provision']) {
    assert.match(r.stdout, new RegExp(`\\n  ${cmd} `), `--help lists ${cmd}`)
  }
  r = same(['plan', '--help'])
  assert.equal(r.status, 0)
  assert.match(r.stdout, /Usage: nanokit plan \[OPTIONS\]/)
  assert.match(r.stdout, /--detailed-exitcode/)
  r = same(['state', '--help'])
  assert.equal(r.status, 0)
  r = same(['--version'])
  assert.equal(r.status, 0)
  assert.equal(r.stdout, `nanokit ${VERSION}\n`)
  r = same(['plan', '--version'])
  assert.equal(r.stdout, `nanokit-plan ${VERSION}\n`)
})

for (const c of ALIASES)
test(`${c.name}: --help and --version name nkapp; the commands are nanokit's`, () => {
  let r = runSync(c, ['--version'])
  assert.equal(r.status, 0, r.stderr)
  assert.equal(r.stdout, `nkapp ${VERSION}\n`)
  r = runSync(c, ['--help'])
  assert.equal(r.status, 0, r.stderr)
  assert.match(r.stdout, /Usage: nkapp <COMMAND>/)
  const nanokit = runSync(npm, ['--help']).stdout
  assert.equal(r.stdout, nanokit.replaceAll('Usage: nanokit', 'Usage: nkapp'))
  r = runSync(c, ['infra', 'unlock', '--help'])
  assert.match(r.stdout, /Usage: nkapp infra unlock/)
  r = runSync(c, ['nosuch'])
  assert.equal(r.status, 1)
  assert.match(r.stderr, /Usage: nkapp <COMMAND>/)
})

for (const c of [...CLIS, ...ALIASES])
test(`${c.name}: deploy is up, under the name Nanokit's docs use`, () => {
  const { dir, file } = project(`name: deploy${process.pid}${c.name.replace(/\W/g, '')}\nservices:\n  a:\n    start: "exec sleep 600"\n`)
  try {
    let r = runSync(c, ['deploy', '--help'])
    assert.equal(r.status, 0, r.stderr)
    assert.match(r.stdout, /`deploy` is the same command: the name Nanokit's docs use for `up`/)
    r = runSync(c, ['deploy', '-f', file])
    assert.equal(r.status, 0, r.stderr)
    assert.match(r.stderr, /^up: 1 service\(s\), 1 changed\.$/m)
    // Nothing left for `up` to do.
    r = runSync(c, ['plan', '-f', file, '--detailed-exitcode'])
    assert.equal(r.status, 0, r.stdout + r.stderr)
  } finally {
    runSync(c, ['down', '-f', file])
    rmSync(dir, { recursive: true, force: true })
  }
})

test('npm and standalone CLI: usage errors and error[CODE] messages, exit 1', () => {
  let r = same(['nosuch'])
  assert.equal(r.status, 1)
  assert.match(r.stderr, /^error: unrecognized subcommand 'nosuch'/)
  r = same(['plan', '--no-such-flag'])
  assert.equal(r.status, 1)
  r = same(['validate', '-f', join(ROOT, 'tests/fixtures/broken/22-cycle-3.yml')])
  assert.equal(r.status, 1)
  assert.equal(r.stdout, '')
  assert.match(r.stderr, /^error\[ENKCYCLE\]: .*22-cycle-3\.yml:\d+:\d+: dependency cycle a → b → c → a; remove one of these `depends_on` entries\n$/)
  const { dir } = project('name: x\n')
  r = same(['plan', '-f', join(dir, 'missing.yml')])
  assert.equal(r.status, 1)
  assert.match(r.stderr, /^error\[ENKCONFIG\]: .*missing\.yml/)
  rmSync(dir, { recursive: true, force: true })
})

test('npm and standalone CLI: plan --detailed-exitcode 2 with changes, 0 without; same --output json', () => {
  const { dir, file } = project(
    `name: clis${process.pid}\nservices:\n  a:\n    start: "exec sleep 600"\n  b:\n    start: "exec sleep 600"\n    depends_on: [a]\n`,
  )
  // The saved plan's path is the same for both; nothing else may differ.
  let r = same(['plan', '-f', file, '--detailed-exitcode'])
  assert.equal(r.status, 2, r.stderr)
  assert.match(r.stdout, /\+ a\b/)
  assert.match(r.stderr, /Saved to .*latest\.json/)
  r = same(['plan', '-f', file])
  assert.equal(r.status, 0, r.stderr)
  // A plan records when it was made; a fresh state gets a new lineage, which
  // salts the config and field hashes.
  const scrub = (t) => t.replace(/"(created_at|lineage)": "[^"]*"/g, '"$1": "…"').replace(/"[0-9a-f]{16,64}"/g, '"#"')
  r = same(['plan', '-f', file, '--output', 'json', '--detailed-exitcode'], { scrub })
  assert.equal(r.status, 2)
  const plan = JSON.parse(r.stdout)
  assert.ok(JSON.stringify(plan).includes('"a"'), r.stdout)
  r = same(['validate', '-f', file, '--output', 'json'])
  assert.deepEqual(JSON.parse(r.stdout).services, ['a', 'b'])
  r = same(['graph', '-f', file, '--format', 'dot'])
  assert.match(r.stdout, /"b" -> "a";/)
  try {
    r = runSync(standalone, ['up', '-f', file])
    assert.equal(r.status, 0, r.stderr)
    r = same(['plan', '-f', file, '--detailed-exitcode'])
    assert.equal(r.status, 0, r.stdout + r.stderr)
    r = same(['plan', '-f', file, '--output', 'json'], { scrub })
    assert.equal(r.status, 0)
    // Status shows live pids and times: identical between the two reads.
    r = same(['status', '-f', file, '--output', 'json'])
    assert.deepEqual(JSON.parse(r.stdout).map((s) => s.status), ['healthy', 'healthy'])
  } finally {
    r = runSync(npm, ['down', '-f', file])
    assert.equal(r.status, 0, r.stderr)
  }
  rmSync(dir, { recursive: true, force: true })
})

// `nanokit … | head`: stdout's reader goes away long before the output ends
// (far more than a pipe buffer). The command must neither panic nor die of
// it, and exits with its own code; any other failure to write stdout (a
// full disk) is an error, not a silently short output.
const bigState = mkdtempSync(join(tmpdir(), 'nk-cli-out-'))
{
  const s = openStateSync({ stateDir: bigState })
  for (let i = 0; i < 3000; i++) s.setSync(`key${i}`, 'v'.repeat(100))
}
for (const c of CLIS) {
  test(`${c.name}: a reader that goes away ends the output, not the command; a full disk is ENKOUTPUT`, () => {
    const env = { ...process.env, NANOKIT_STATE_DIR: bigState }
    const args = [...c.pre, 'state', 'list', '-o', 'json']
    const piped = spawnSync('bash', ['-c', '"$0" "$@" | head -c 10 >/dev/null; exit ${PIPESTATUS[0]}', c.cmd, ...args], {
      env,
      encoding: 'utf8',
    })
    assert.equal(piped.status, 0, piped.stderr)
    assert.equal(piped.stderr, '')
    const full = openSync('/dev/full', 'w')
    try {
      const r = spawnSync(c.cmd, args, { env, encoding: 'utf8', stdio: ['ignore', full, 'pipe'] })
      assert.equal(r.status, 1, r.stderr)
      assert.match(r.stderr, /^error\[ENKOUTPUT\]: writing to stdout failed: No space left on device/)
      assert.doesNotMatch(r.stderr, /panicked/)
    } finally {
      closeSync(full)
    }
  })
}

// `logs --follow` only prints: once its reader is gone it stops, exit 0,
// instead of following the log for nobody until a Ctrl-C.
for (const c of CLIS) {
  test(`${c.name}: logs --follow stops once its reader goes away`, async () => {
    const p = project('name: follow\nservices:\n  api:\n    start: "sleep 1"\n')
    const log = join(p.dir, '.nanokit', 'logs', 'local', 'api.log')
    mkdirSync(dirname(log), { recursive: true })
    writeFileSync(log, 'first line\n')
    const child = spawn(
      'bash',
      ['-c', '"$0" "$@" | head -c 5 >/dev/null; exit ${PIPESTATUS[0]}', c.cmd, ...c.pre, 'logs', 'api', '--follow', '-f', p.file],
      { cwd: p.dir, stdio: ['ignore', 'ignore', 'pipe'], detached: true },
    )
    let stderr = ''
    child.stderr.on('data', (d) => (stderr += d))
    const grow = setInterval(() => appendFileSync(log, 'another line\n'), 100)
    // Still following after 20 s: kill the pipeline (its process group).
    const guard = setTimeout(() => process.kill(-child.pid, 'SIGKILL'), 20000)
    const code = await new Promise((done) => child.on('exit', (code, signal) => done(signal ?? code)))
    clearInterval(grow)
    clearTimeout(guard)
    child.stderr.destroy()
    assert.equal(code, 0, `exit ${code}; stderr: ${stderr}`)
    assert.equal(stderr, '')
    rmSync(p.dir, { recursive: true, force: true })
  })
}
