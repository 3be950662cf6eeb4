#!/usr/bin/env node
'use strict'
// The npx entry (`nanokit`, alias `nkapp`): hand argv to the native CLI
// (parsed with clap in Rust). `--help` and `--version` use the name it was
// started under.
const { basename, delimiter, resolve } = require('node:path')
let native
try {
  native = require('../binding.js')
} catch (err) {
  // No binding for this platform: the error says why and what to do; the
  // generated loader's own chain of errors only with NANOKIT_LOG=debug.
  console.error(`nanokit: error[${err.code || 'ENKBINDING'}]: ${err.message}`)
  if (/debug|trace/.test(process.env.NANOKIT_LOG || '')) {
    for (let cause = err.cause; cause; cause = cause.cause) console.error(`  ${cause.message}`)
  }
  process.exit(1)
}

const name = basename(process.argv[1] || '', '.js') === 'nkapp' ? 'nkapp' : 'nanokit'

/** `s` as one shell word. */
function quote(s) {
  return /^[\w./:@%+=,-]+$/.test(s) ? s : `'${s.replaceAll("'", "'\\''")}'`
}

/**
 * How the shell this was started from would start it again, for the
 * commands it prints as hints: `npx nanokit` when npm started it (npx, an
 * npm script: its bin is not on the shell's PATH), the name when found on
 * PATH, else the path it was started by.
 */
function program() {
  const script = process.argv[1] || ''
  if (basename(script) !== name) return `node ${quote(script)}`
  if (process.env.npm_command) return `npx ${name}`
  const onPath = (process.env.PATH || '').split(delimiter).some((d) => d && resolve(d, name) === resolve(script))
  return onPath ? name : quote(script)
}

native.cli(process.argv.slice(2), program()).then(
  (code) => {
    process.exitCode = code
  },
  (err) => {
    console.error(`${name}: ${err.message}`)
    process.exitCode = 1
  },
)
