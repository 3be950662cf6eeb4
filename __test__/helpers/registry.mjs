// A tiny npm registry on 127.0.0.1 serving fixture packages, so the tests
// exercise real `npm install` with no network access.
import { execFileSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:http'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'

/** The fixture packages: name → { version, dependencies, files }. */
export const FIXTURES = [
  {
    name: 'nk-fixture-dep',
    version: '1.0.0',
    files: { 'index.js': "module.exports = 'dep@1.0.0'\n" },
  },
  {
    // Has a dependency, and counts its installs through a postinstall script.
    name: 'nk-fixture-a',
    version: '1.0.0',
    dependencies: { 'nk-fixture-dep': '^1.0.0' },
    scripts: { postinstall: 'node count.js' },
    files: {
      'index.js': "module.exports = 'a:' + require('nk-fixture-dep')\n",
      'count.js': COUNT_SCRIPT(),
    },
  },
  ...['b', 'c', 'd'].map((x) => ({
    name: `nk-fixture-${x}`,
    version: '1.0.0',
    dependencies: { 'nk-fixture-dep': '^1.0.0' },
    // Slow enough that installs started together overlap in time.
    scripts: { postinstall: 'node count.js && node -e "setTimeout(()=>{},800)"' },
    files: {
      'index.js': `module.exports = '${x}:' + require('nk-fixture-dep')\n`,
      'count.js': COUNT_SCRIPT(),
    },
  })),
  {
    name: '@nkfix/scoped',
    version: '2.0.0',
    files: { 'index.js': "module.exports = 'scoped@2.0.0'\n" },
  },
]

function COUNT_SCRIPT() {
  return [
    "const fs = require('fs')",
    "if (process.env.NK_INSTALL_COUNTER) fs.appendFileSync(process.env.NK_INSTALL_COUNTER, require('./package.json').name + '\\n')",
    '',
  ].join('\n')
}

function pack(fixture, workdir) {
  const dir = join(workdir, 'src', `${fixture.name.replace('/', '+')}@${fixture.version}`)
  mkdirSync(dir, { recursive: true })
  const manifest = {
    name: fixture.name,
    version: fixture.version,
    main: 'index.js',
    dependencies: fixture.dependencies || {},
    scripts: fixture.scripts || {},
    ...fixture.manifest,
  }
  writeFileSync(join(dir, 'package.json'), JSON.stringify(manifest, null, 2))
  for (const [file, body] of Object.entries(fixture.files)) {
    mkdirSync(dirname(join(dir, file)), { recursive: true })
    writeFileSync(join(dir, file), body)
  }
  const out = join(workdir, 'tarballs')
  mkdirSync(out, { recursive: true })
  const before = new Set(readdirSync(out))
  execFileSync('npm', ['pack', '--silent', '--pack-destination', out, dir], { stdio: ['ignore', 'ignore', 'inherit'] })
  const file = readdirSync(out).find((f) => !before.has(f))
  return { manifest, file: join(out, file) }
}

/** A tarball made elsewhere (`npm pack`), served as it is. */
function prepacked(file) {
  const manifest = JSON.parse(execFileSync('tar', ['-xOzf', file, 'package/package.json'], { encoding: 'utf8' }))
  return { manifest, file }
}

/**
 * Packs the fixtures (plus `extra`, same shape, or `{ tarball }` for one
 * packed already) and serves them. On a fixture,
 * `tarballDelayMs` makes its tarball answer that late (`Infinity`: never, until
 * the registry closes); `failMetadata: [500, 500]` answers its first metadata
 * requests with those statuses, then normally; `corruptTarball: true` serves
 * its tarball with one byte changed (its integrity no longer matches). Several versions of one name
 * are served together. Returns { url, close, npmArgs, hits } where npmArgs
 * point npm at this registry with a private cache and `hits(name)` counts the
 * metadata requests for `name`.
 */
export async function startRegistry({ extra = [], fixtures = FIXTURES } = {}) {
  const workdir = mkdtempSync(join(tmpdir(), 'nk-registry-'))
  // name → { versions: Map(version → { manifest, file }), delayMs, fail: [...] }
  const packages = new Map()
  const tarballs = new Map()
  const hits = new Map()
  for (const fixture of [...fixtures, ...extra]) {
    const packed = fixture.tarball ? prepacked(fixture.tarball) : pack(fixture, workdir)
    const { name, version } = packed.manifest
    let entry = packages.get(name)
    if (!entry) packages.set(name, (entry = { versions: new Map(), delayMs: 0, fail: [] }))
    entry.versions.set(version, packed)
    entry.delayMs = fixture.tarballDelayMs || entry.delayMs
    if (fixture.failMetadata) entry.fail.push(...fixture.failMetadata)
    tarballs.set(`${name}/${version}`, { file: packed.file, delayMs: fixture.tarballDelayMs || 0, corrupt: !!fixture.corruptTarball })
  }
  const server = createServer((req, res) => {
    const path = decodeURIComponent(req.url.split('?')[0]).replace(/^\//, '')
    if (path.startsWith('-/tarballs/')) {
      const tarball = tarballs.get(path.slice('-/tarballs/'.length))
      if (!tarball) return res.writeHead(404).end()
      const send = () => {
        res.writeHead(200, { 'content-type': 'application/octet-stream' })
        const bytes = readFileSync(tarball.file)
        if (tarball.corrupt) bytes[bytes.length - 5] ^= 0xff
        res.end(bytes)
      }
      if (tarball.delayMs === Infinity) return // held until the registry closes
      return tarball.delayMs ? setTimeout(send, tarball.delayMs) : send()
    }
    const pkg = packages.get(path)
    hits.set(path, (hits.get(path) ?? 0) + 1)
    if (!pkg) {
      res.writeHead(404, { 'content-type': 'application/json' })
      return res.end(JSON.stringify({ error: 'not found' }))
    }
    const status = pkg.fail.shift()
    if (status) {
      res.writeHead(status, { 'content-type': 'application/json' })
      return res.end(JSON.stringify({ error: `fixture failure ${status}` }))
    }
    const { port } = server.address()
    const versions = {}
    let latest
    for (const [v, { manifest, file }] of pkg.versions) {
      const tgz = readFileSync(file)
      versions[v] = {
        ...manifest,
        dist: {
          tarball: `http://127.0.0.1:${port}/-/tarballs/${encodeURIComponent(manifest.name)}/${v}`,
          shasum: createHash('sha1').update(tgz).digest('hex'),
          integrity: 'sha512-' + createHash('sha512').update(tgz).digest('base64'),
        },
      }
      latest = v
    }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ name: path, 'dist-tags': { latest }, versions }))
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const url = `http://127.0.0.1:${server.address().port}/`
  const cache = join(workdir, 'npm-cache')
  return {
    url,
    npmArgs: [`--registry=${url}`, `--cache=${cache}`, '--no-update-notifier', '--prefer-online'],
    hits: (name) => hits.get(name) ?? 0,
    close: () =>
      new Promise((resolve) => {
        server.close(resolve)
        server.closeAllConnections()
      }),
  }
}
