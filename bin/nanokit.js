#!/usr/bin/env node
'use strict'
// The npx entry: hand argv to the native CLI (parsed with clap in Rust).
// Installed as `nanokit` and as its alias `nkapp`; `--help` and `--version`
// use the name it was started under.
const { basename } = require('node:path')
const { cli } = require('../index.js')

const name = basename(process.argv[1] || '', '.js') === 'nkapp' ? 'nkapp' : 'nanokit'
cli(process.argv.slice(2), name).then(
  (code) => {
    process.exitCode = code
  },
  (err) => {
    console.error(`${name}: ${err.message}`)
    process.exitCode = 1
  },
)
