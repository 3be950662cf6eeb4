#!/usr/bin/env node
'use strict'
// The npx entry: hand argv to the native CLI (parsed with clap in Rust).
const { cli } = require('../index.js')

cli(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (err) => {
    console.error(`nanokit: ${err.message}`)
    process.exitCode = 1
  },
)
