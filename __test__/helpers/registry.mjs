// A tiny npm registry on 127.0.0.1 serving fixture packages, so the tests
// exercise real `npm install` with no network access.
import { execFileSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

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
  const dir = join(workdir, 'src', fixture.name.replace('/', '+'))
  mkdirSync(dir, { recursive: true })
  const manifest = {
    name: fixture.name,
    version: fixture.version,
    main: 'index.js',
    dependencies: fixture.dependencies || {},
    scripts: fixture.scripts || {},
  }
  writeFileSync(join(dir, 'package.json'), JSON.stringify(manifest, null, 2))
  for (const [file, body] of Object.entries(fixture.files)) writeFileSync(join(dir, file), body)
  const out = join(workdir, 'tarballs')
  mkdirSync(out, { recursive: true })
  const before = new Set(readdirSync(out))
  execFileSync('npm', ['pack', '--silent', '--pack-destination', out, dir], { stdio: ['ignore', 'ignore', 'inherit'] })
  const file = readdirSync(out).find((f) => !before.has(f))
  return { manifest, file: join(out, file) }
}

/**
 * Packs the fixtures (plus `extra`, same shape; `tarballDelayMs` on one makes
 * its tarball answer that late) and serves them. Returns { url, close, npmArgs }
 * where npmArgs point npm at this registry with a private cache.
 */
export async function startRegistry({ extra = [] } = {}) {
  const workdir = mkdtempSync(join(tmpdir(), 'nk-registry-'))
  const packages = new Map()
  for (const fixture of [...FIXTURES, ...extra]) packages.set(fixture.name, { ...pack(fixture, workdir), delayMs: fixture.tarballDelayMs || 0 })
  const server = createServer((req, res) => {
    const path = decodeURIComponent(req.url.split('?')[0]).replace(/^\//, '')
    if (path.startsWith('-/tarballs/')) {
      const name = path.slice('-/tarballs/'.length)
      const pkg = packages.get(name)
      if (!pkg) return res.writeHead(404).end()
      const send = () => {
        res.writeHead(200, { 'content-type': 'application/octet-stream' })
        res.end(readFileSync(pkg.file))
      }
      return pkg.delayMs ? setTimeout(send, pkg.delayMs) : send()
    }
    const pkg = packages.get(path)
    if (!pkg) {
      res.writeHead(404, { 'content-type': 'application/json' })
      return res.end(JSON.stringify({ error: 'not found' }))
    }
    const tgz = readFileSync(pkg.file)
    const { port } = server.address()
    const version = {
      ...pkg.manifest,
      dist: {
        tarball: `http://127.0.0.1:${port}/-/tarballs/${encodeURIComponent(pkg.manifest.name)}`,
        shasum: createHash('sha1').update(tgz).digest('hex'),
        integrity: 'sha512-' + createHash('sha512').update(tgz).digest('base64'),
      },
    }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(
      JSON.stringify({
        name: pkg.manifest.name,
        'dist-tags': { latest: pkg.manifest.version },
        versions: { [pkg.manifest.version]: version },
      }),
    )
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const url = `http://127.0.0.1:${server.address().port}/`
  const cache = join(workdir, 'npm-cache')
  return {
    url,
    npmArgs: [`--registry=${url}`, `--cache=${cache}`, '--no-update-notifier', '--prefer-online'],
    close: () => new Promise((resolve) => server.close(resolve)),
  }
}
