// Tracing from JS and in a browser: `up` / `down` results and rejections
// carry the run's trace id and local trace file; `nanokit timeline` renders
// the trace as HTML, checked from headless Chromium's own DOM (one bar per
// span, failures marked, bars laid out on the time axis).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'
import { execFileSync } from 'node:child_process'

import { needsChromium, requireChromium } from './helpers/services.mjs'
import { CLIS, runSync } from './helpers/clis.mjs'

const require = createRequire(import.meta.url)
const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const nk = require(join(root, 'nanokit.js'))

function project(yml) {
  const dir = mkdtempSync(join(tmpdir(), 'nk-trace-'))
  const file = join(dir, 'nanokit.yml')
  writeFileSync(file, yml)
  return file
}

const YML = `name: traced
services:
  a:
    start: "exec sleep 600"
    env: { SECRET_TOKEN: "js-secret-9876" }
  b:
    start: "exec sleep 600"
    depends_on: [a]
    env: { SECRET_TOKEN: "js-secret-9876" }
    hooks:
      prestart: "echo \\"$TRACEPARENT\\" > b.traceparent"
      poststart: "echo token $SECRET_TOKEN; exit 4"
`

/** A failing up: returns { file, err, trace }. */
async function failingUp() {
  const file = project(YML)
  const err = await nk.up({ file }).then(
    () => assert.fail('up should fail: b’s poststart exits 4'),
    (e) => e,
  )
  await nk.down({ file })
  const trace = JSON.parse(readFileSync(err.traceFile, 'utf8'))
  return { file, err, trace }
}

test('JS API: up/down resolve with their trace id and file; a rejection carries them', async () => {
  const file = project('name: ok\nservices:\n  a:\n    start: "exec sleep 600"\n')
  const up = await nk.up({ file })
  assert.match(up.traceId, /^[0-9a-f]{32}$/)
  assert.ok(up.run.endsWith(`-up-${up.traceId.slice(0, 8)}`), up.run)
  assert.ok(existsSync(up.traceFile), up.traceFile)
  const t = JSON.parse(readFileSync(up.traceFile, 'utf8'))
  assert.equal(t.trace_id, up.traceId)
  assert.equal(t.outcome, 'ok')
  assert.equal(t.spans.find((s) => !s.parent_span_id).name, 'nanokit up')
  const down = await nk.down({ file })
  assert.notEqual(down.traceId, up.traceId)
  assert.ok(existsSync(down.traceFile))

  const { err, trace } = await failingUp()
  assert.equal(err.code, 'ENKFAILED')
  assert.match(err.traceId, /^[0-9a-f]{32}$/)
  assert.doesNotMatch(err.message, /\[trace/, 'the trace suffix is moved off the message')
  assert.equal(trace.trace_id, err.traceId)
  assert.equal(trace.outcome, 'failed')
  const text = readFileSync(err.traceFile, 'utf8')
  assert.ok(!text.includes('js-secret-9876'), 'no env values in the trace file')
  const hook = trace.spans.find((s) => s.name === 'poststart')
  assert.equal(hook.status, 'error')
  assert.match(hook.attributes.error, /token \*\*\*/)
  // The prestart hook saw its own span as TRACEPARENT.
  const pre = trace.spans.find((s) => s.name === 'prestart')
  const tp = readFileSync(join(dirname(err.traceFile), '..', '..', 'b.traceparent'), 'utf8').trim()
  assert.equal(tp, `00-${trace.trace_id}-${pre.span_id}-01`)
})

for (const c of CLIS)
test(`${c.name} CLI: nanokit timeline renders the latest run and prints the slowest steps`, async () => {
  const { file, trace } = await failingUp()
  // The latest run is the `down` after the failing up; name the up.
  const r = runSync(c, ['timeline', trace.run, '-f', file])
  assert.equal(r.status, 0, r.stderr)
  assert.match(r.stdout, /nanokit up of traced \(local\).*FAILED/)
  assert.match(r.stdout, /Slowest steps:/)
  assert.match(r.stdout, /b › poststart: hook poststart `echo token \$SECRET_TOKEN; exit 4` failed \(exit code 4\)/)
  const html = r.stdout.match(/Timeline: (.+\.html)/)[1]
  assert.ok(existsSync(html))
  const list = runSync(c, ['timeline', '--list', '--output', 'json', '-f', file])
  const runs = JSON.parse(list.stdout)
  assert.deepEqual(runs.map((x) => x.command), ['up', 'down'])
})

for (const c of CLIS)
test(`${c.name} CLI: timeline page in headless Chromium: one bar per span, failures marked, laid out in time`, needsChromium(), async () => {
  const CHROMIUM = requireChromium()
  const { chromium } = require('playwright-core')
  const { file, trace } = await failingUp()
  const out = join(dirname(file), 'timeline.html')
  const r = runSync(c, ['timeline', trace.run, '-f', file, '-o', out])
  assert.equal(r.status, 0, r.stderr)
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  })
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } })
    const requests = []
    page.on('request', (req) => requests.push(req.url()))
    await page.goto(`file://${out}`)
    const dom = await page.evaluate(() => {
      const track = document.querySelector('.row:not(.axis) .track').getBoundingClientRect()
      return {
        outcome: document.getElementById('outcome').textContent,
        scripts: document.scripts.length,
        bars: [...document.querySelectorAll('.bar')].map((b) => {
          const r = b.getBoundingClientRect()
          return {
            id: b.dataset.spanId,
            name: b.dataset.name,
            service: b.dataset.service,
            classes: [...b.classList],
            bg: getComputedStyle(b).backgroundColor,
            mark: b.querySelector('.mark')?.textContent ?? null,
            left: r.left - track.left,
            width: r.width,
            trackWidth: track.width,
          }
        }),
        failures: [...document.querySelectorAll('#failures b')].map((b) => b.textContent),
      }
    })
    assert.deepEqual(requests.filter((u) => !u.startsWith('file://')), [], 'self-contained: no network')
    assert.equal(dom.scripts, 0)
    assert.equal(dom.outcome, 'failed')
    // One bar per span, each the span it claims to be.
    assert.equal(dom.bars.length, trace.spans.length)
    assert.deepEqual(new Set(dom.bars.map((b) => b.id)), new Set(trace.spans.map((s) => s.span_id)))
    const t0 = trace.start_unix_nano
    const total = trace.end_unix_nano - t0
    for (const b of dom.bars) {
      const s = trace.spans.find((x) => x.span_id === b.id)
      assert.equal(b.name, s.name)
      assert.ok(b.width >= 2, `${s.name} is visible`)
      // Positioned on the time axis (within 1.5 % of the track).
      const expected = ((s.start_unix_nano - t0) / total) * b.trackWidth
      assert.ok(Math.abs(b.left - expected) <= b.trackWidth * 0.015, `${s.name} at ${b.left}, expected ${expected}`)
    }
    // Failures marked: exactly the spans with error status, drawn red with a mark.
    const failed = dom.bars.filter((b) => b.classes.includes('failed'))
    assert.deepEqual(
      new Set(failed.map((b) => b.id)),
      new Set(trace.spans.filter((s) => s.status === 'error').map((s) => s.span_id)),
    )
    const hook = failed.find((b) => b.name === 'poststart')
    assert.ok(hook, 'the failing hook is marked')
    assert.equal(hook.service, 'b')
    assert.equal(hook.bg, 'rgb(220, 38, 38)')
    assert.match(hook.mark, /failed/)
    assert.deepEqual(dom.failures, ['b › poststart'])
    // Dependency waits are visible as their own (hatched) bars.
    const wait = dom.bars.find((b) => b.name === 'dependencies' && b.service === 'b')
    assert.ok(wait && wait.classes.includes('wait'), 'b’s wait for a is drawn')
  } finally {
    await browser.close()
  }
})

test('JS install: its spans reach an OTLP/HTTP collector when OTEL_EXPORTER_OTLP_ENDPOINT is set', async () => {
  const { createServer } = await import('node:http')
  const { spawn } = await import('node:child_process')
  const bodies = []
  const server = createServer((req, res) => {
    const chunks = []
    req.on('data', (c) => chunks.push(c))
    req.on('end', () => {
      bodies.push({ url: req.url, type: req.headers['content-type'], body: Buffer.concat(chunks) })
      res.writeHead(200, { 'content-type': 'application/x-protobuf' }).end()
    })
  })
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const repo = mkdtempSync(join(tmpdir(), 'nk-trace-repo-'))
  const script = `
    const nk = require(${JSON.stringify(join(root, 'nanokit.js'))})
    const { mkdirSync, writeFileSync } = require('node:fs')
    const { join } = require('node:path')
    nk.install(${JSON.stringify(repo)}, 'traced-pkg@1.0.0', {
      install: async (_s, dir) => {
        const pkg = join(dir, 'node_modules', 'traced-pkg_1.0.0')
        mkdirSync(pkg, { recursive: true })
        writeFileSync(join(pkg, 'package.json'), JSON.stringify({ name: 'traced-pkg', version: '1.0.0' }))
      },
    }).then(() => nk.flushTraces()).then(() => process.exit(0), (e) => { console.error(e); process.exit(1) })`
  const env = { ...process.env, OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${server.address().port}` }
  delete env.NANOKIT_TRACE
  const child = spawn(process.execPath, ['-e', script], { env, stdio: ['ignore', 'inherit', 'inherit'] })
  const code = await new Promise((r) => child.on('exit', r))
  server.close()
  assert.equal(code, 0)
  assert.ok(bodies.length >= 1, 'an export request arrived')
  assert.ok(bodies.every((b) => b.url === '/v1/traces' && b.type === 'application/x-protobuf'))
  // Span names are protobuf strings: present verbatim in the request.
  const all = Buffer.concat(bodies.map((b) => b.body)).toString('latin1')
  for (const name of ['repo.begin_install', 'lock.wait', 'repo.publish', 'traced-pkg@1.0.0']) {
    assert.ok(all.includes(name), `${name} exported`)
  }
})

// The test PKI (scripts/test-certs.sh): NANOKIT_TEST_CERTS, else made here.
function testCerts() {
  if (process.env.NANOKIT_TEST_CERTS) return process.env.NANOKIT_TEST_CERTS
  const out = execFileSync('bash', [join(root, 'scripts/test-certs.sh')], { encoding: 'utf8' })
  return out.trim().replace(/^export NANOKIT_TEST_CERTS=/, '').replace(/^'|'$/g, '')
}

// A JS install with OTEL_EXPORTER_OTLP_ENDPOINT=`endpoint` and `extra`
// variables, in a child; resolves with its exit code and stderr.
async function installTraced(endpoint, extra = {}) {
  const { spawn } = await import('node:child_process')
  const repo = mkdtempSync(join(tmpdir(), 'nk-trace-tls-'))
  const script = `
    const nk = require(${JSON.stringify(join(root, 'nanokit.js'))})
    const { mkdirSync, writeFileSync } = require('node:fs')
    const { join } = require('node:path')
    const install = async (_s, dir) => {
      const pkg = join(dir, 'node_modules', 'tls-pkg_1.0.0')
      mkdirSync(pkg, { recursive: true })
      writeFileSync(join(pkg, 'package.json'), '{}')
    }
    nk.install(${JSON.stringify(repo)}, 'tls-pkg@1.0.0', { install })
      .then(() => nk.flushTraces())
      .then(() => process.exit(0), (e) => { console.error(e); process.exit(1) })`
  const env = { ...process.env, OTEL_EXPORTER_OTLP_ENDPOINT: endpoint, ...extra }
  delete env.NANOKIT_TRACE
  const child = spawn(process.execPath, ['-e', script], { env, stdio: ['ignore', 'inherit', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (d) => (stderr += d))
  const code = await new Promise((r) => child.on('exit', r))
  return { code, stderr }
}

test('JS install: its spans reach an https collector trusted through OTEL_EXPORTER_OTLP_CERTIFICATE', async () => {
  const { createServer } = await import('node:https')
  const certs = testCerts()
  const bodies = []
  const server = createServer(
    { cert: readFileSync(join(certs, 'loopback.pem')), key: readFileSync(join(certs, 'loopback-key.pem')) },
    (req, res) => {
      const chunks = []
      req.on('data', (c) => chunks.push(c))
      req.on('end', () => {
        bodies.push({ url: req.url, body: Buffer.concat(chunks) })
        res.writeHead(200, { 'content-type': 'application/x-protobuf' }).end()
      })
    },
  )
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const { code, stderr } = await installTraced(`https://localhost:${server.address().port}`, {
    OTEL_EXPORTER_OTLP_CERTIFICATE: join(certs, 'ca.pem'),
  })
  server.close()
  assert.equal(code, 0, stderr)
  assert.doesNotMatch(stderr, /OpenTelemetry/)
  const all = Buffer.concat(bodies.map((b) => b.body)).toString('latin1')
  assert.ok(bodies.every((b) => b.url === '/v1/traces'))
  assert.ok(all.includes('repo.begin_install'), 'the spans arrived over https')
})

test('an https:// OTLP endpoint whose handshake fails gives one warning, and the install succeeds', async () => {
  const { createServer } = await import('node:net')
  let connections = 0
  const server = createServer((s) => {
    connections++
    s.destroy()
  })
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const { code, stderr } = await installTraced(`https://127.0.0.1:${server.address().port}`)
  server.close()
  assert.equal(code, 0, stderr)
  assert.equal(stderr.match(/OpenTelemetry export to https:\/\/127\.0\.0\.1:\d+\S* failed/g)?.length, 1, stderr)
  assert.equal(stderr.match(/OpenTelemetry/g)?.length, 1, stderr)
  assert.ok(connections >= 1, 'nanokit tried the https endpoint')
})
