// Watches a package repository at every instant it can, in its own process,
// while other processes install into it and get killed. argv[2] is JSON:
// { repo, packages: [{ spec, alias, files: [relative paths] }] }.
// Invariants checked on every pass:
//   * isInstalled / handleIsInstalled ⇒ every file of the package is there
//     AND the repo's package.json lists it;
//   * a package directory visible in node_modules is complete (no half package);
//   * the repo's package.json, when present, is valid JSON.
// On "stop" (stdin) it prints { passes, violations } and exits.
import { existsSync, readFileSync, readdirSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join } from 'node:path'

const require = createRequire(import.meta.url)
const nk = require('../../nanokit.js')

// `probe: false` leaves isInstalled alone (asking it is a use, which repo gc counts).
const { repo, packages, probe = true } = JSON.parse(process.argv[2])
const handlers = nk.createLockedHandlers(repo)
const violations = []
let passes = 0
let stop = false
process.stdin.on('data', (d) => {
  if (String(d).includes('stop')) stop = true
})

const note = (what) => {
  if (violations.length < 50) violations.push(`${new Date().toISOString()} ${what}`)
}

function manifestDeps() {
  let text
  try {
    text = readFileSync(join(repo, 'package.json'), 'utf8')
  } catch {
    return {}
  }
  try {
    return JSON.parse(text).dependencies || {}
  } catch (e) {
    note(`package.json is not valid JSON: ${e.message}`)
    return {}
  }
}

function missingFiles(pkg) {
  const dir = join(repo, 'node_modules', pkg.alias)
  return pkg.files.filter((f) => !existsSync(join(dir, f)))
}

async function pass() {
  for (const pkg of packages) {
    const installed = probe && nk.isInstalled(repo, pkg.spec)
    const viaHandler = probe && (await handlers.handleIsInstalled(pkg.spec, repo))
    if (installed || viaHandler) {
      const missing = missingFiles(pkg)
      if (missing.length) note(`${pkg.spec} reads as installed but ${missing.length} files are missing (e.g. ${missing[0]})`)
      if (!manifestDeps()[pkg.alias]) note(`${pkg.spec} reads as installed but package.json does not list ${pkg.alias}`)
    }
    let names
    try {
      names = new Set(readdirSync(join(repo, 'node_modules', pkg.alias)))
    } catch {
      continue // absent: fine
    }
    const top = pkg.files.filter((f) => !f.includes('/'))
    const absent = top.filter((f) => !names.has(f))
    if (absent.length) note(`half package visible: ${pkg.alias} lacks ${absent.length} of ${top.length} files`)
  }
  manifestDeps()
  passes++
}

while (!stop) {
  await pass()
  await new Promise((r) => setImmediate(r))
}
process.stdin.destroy() // let the process exit
process.stdout.write(JSON.stringify({ passes, violations }) + '\n')
