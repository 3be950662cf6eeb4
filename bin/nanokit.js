#!/usr/bin/env node
'use strict'
// The npx entry (`nanokit`, alias `nkapp`): hand argv to the native CLI
// (parsed with clap in Rust). `--help` and `--version` use the name it was
// started under.
const { basename } = require('node:path')
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

const name = basename(process.argv[1] || '', '.js') === 'nkapp' ? 'nkapp' : 'nanokit'
native.cli(process.argv.slice(2), name).then(
  (code) => {
    process.exitCode = code
  },
  (err) => {
    console.error(`${name}: ${err.message}`)
    process.exitCode = 1
  },
)
