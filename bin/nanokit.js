#!/usr/bin/env node
'use strict'
// The npx entry (`nanokit`, alias `nkapp`): hand argv to the native CLI
// (parsed with clap in Rust).
let native
try {
  native = require('../index.js')
} catch (err) {
  // No prebuilt addon for this platform: the loader's errors name the
  // platform package it looked for.
  console.error(`nanokit: ${err.message}`)
  for (let cause = err.cause; cause; cause = cause.cause) console.error(`  ${cause.message}`)
  process.exit(1)
}

native.cli(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (err) => {
    console.error(`nanokit: ${err.message}`)
    process.exitCode = 1
  },
)
