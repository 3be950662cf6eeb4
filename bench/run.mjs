#!/usr/bin/env node
// Runs every benchmark under bench/ in turn (one process tree).
import { spawnSync } from 'node:child_process'
import { readdirSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const dir = dirname(fileURLToPath(import.meta.url))
const only = process.argv.slice(2)
let failed = false
for (const file of readdirSync(dir).filter((f) => f.endsWith('.mjs') && f !== 'run.mjs').sort()) {
  if (only.length && !only.some((o) => file.includes(o))) continue
  console.log(`\n=== bench/${file}`)
  const r = spawnSync(process.execPath, [join(dir, file)], { stdio: 'inherit' })
  failed ||= r.status !== 0
}
process.exit(failed ? 1 : 0)
