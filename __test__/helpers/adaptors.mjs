// Fixture adaptors for the offline registry that share dependencies the way
// OpenFn's adaptors share theirs (every adaptor depends on a common library,
// in one of two versions, several on an HTTP client and a date library),
// including two versions of one adaptor that differ in a few files. Used by
// the store tests and by bench/repo.mjs; `scale` scales every package's size.
import { createHash } from 'node:crypto'

/** Deterministic text of `bytes` bytes for `seed`: the same seed, the same bytes. */
function body(seed, bytes) {
  let out = `// ${seed}\n`
  let block = createHash('sha256').update(seed).digest('hex')
  while (out.length < bytes) {
    out += `exports[${JSON.stringify(block.slice(0, 8))}] = ${JSON.stringify(block)}\n`
    block = createHash('sha256').update(block).digest('hex')
  }
  return out
}

/** `count` files `lib/f<i>.js` of about `bytes` each, seeded by `seed`. */
function files(seed, count, bytes) {
  return Object.fromEntries(Array.from({ length: count }, (_, i) => [`lib/f${i}.js`, body(`${seed}/${i}`, bytes)]))
}

/** One adaptor: CommonJS exporting `fn` and `execute` as OpenFn's adaptors do, plus its own files. */
function adaptor(name, version, deps, { files: n, bytes, seed = name, extra = {} }) {
  const index = [
    "const common = require('nk-lib-common')",
    ...Object.keys(deps)
      .filter((d) => d !== 'nk-lib-common')
      .map((d) => `require(${JSON.stringify(d)})`),
    `exports.name = ${JSON.stringify(`${name}@${version}`)}`,
    'exports.fn = (f) => (state) => f(state)',
    'exports.execute = (...ops) => (state) => ops.reduce((p, op) => p.then(op), Promise.resolve(common.clone(state)))',
    `exports.adaptor = () => (state) => ({ ...state, data: { ...state.data, adaptor: ${JSON.stringify(`${name}@${version}`)} } })`,
    '',
  ].join('\n')
  return {
    name,
    version,
    dependencies: deps,
    files: { 'index.js': index, ...files(seed, n, bytes), ...extra },
  }
}

/**
 * The fixture set: 4 libraries and 6 adaptors. As among OpenFn's adaptors
 * (which pin different versions of language-common), the adaptors pin two
 * versions of the common library, 1.0.0 and 1.1.0, which share 90 % of
 * their files; and there are two versions of @nkfix/adaptor-http, which
 * share all their files but two. `scale` multiplies the number of files.
 */
export function adaptorFixtures({ scale = 1 } = {}) {
  const n = (k) => Math.max(1, Math.round(k * scale))
  const common = (version, changed) => ({
    name: 'nk-lib-common',
    version,
    files: {
      'index.js': `exports.clone = (s) => JSON.parse(JSON.stringify(s))\nexports.version = ${JSON.stringify(version)}\n`,
      ...files('common', n(200), 4000),
      // The files this version changed.
      ...Object.fromEntries(Array.from({ length: changed }, (_, i) => [`lib/f${i}.js`, body(`common/${version}/${i}`, 4000)])),
    },
  })
  const libs = [
    common('1.0.0', 0),
    common('1.1.0', n(20)),
    { name: 'nk-lib-http', version: '1.0.0', dependencies: { 'nk-lib-common': '^1.0.0' }, files: { 'index.js': "require('nk-lib-common')\n", ...files('http', n(60), 4000) } },
    { name: 'nk-lib-date', version: '1.0.0', files: { 'index.js': 'module.exports = Date\n', ...files('date', n(40), 4000) } },
  ]
  const v1 = { 'nk-lib-common': '1.0.0' }
  const v11 = { 'nk-lib-common': '1.1.0' }
  const http = { 'nk-lib-http': '^1.0.0' }
  const date = { 'nk-lib-date': '^1.0.0' }
  const own = { files: n(30), bytes: 3000 }
  const adaptors = [
    adaptor('@nkfix/adaptor-http', '1.0.0', { ...v1, ...http }, { ...own, seed: 'adaptor-http' }),
    // The next version: the newer common library, the same files but two.
    adaptor('@nkfix/adaptor-http', '1.1.0', { ...v11, ...http }, {
      ...own,
      seed: 'adaptor-http',
      extra: { 'lib/f0.js': body('adaptor-http/1.1.0/0', 3000), 'lib/f1.js': body('adaptor-http/1.1.0/1', 3000) },
    }),
    adaptor('@nkfix/adaptor-salesforce', '1.0.0', { ...v11, ...http, ...date }, own),
    adaptor('@nkfix/adaptor-dhis2', '1.0.0', { ...v1, ...http }, own),
    adaptor('@nkfix/adaptor-postgres', '1.0.0', v11, own),
    adaptor('@nkfix/adaptor-mail', '1.0.0', { ...v1, ...date }, own),
  ]
  return { libs, adaptors, specs: adaptors.map((a) => `${a.name}@${a.version}`) }
}
