// The services some specs need (PostgreSQL, headless Chromium), with one rule
// (the same as the cargo tests', see build.rs): outside CI, a missing service
// makes the test a node:test *skip* with a "SKIPPED: …" reason; in CI
// (CI=true), it is a failure, never a silent pass.
import { existsSync } from 'node:fs'

/** Whether `CI` says this is a CI run (anything but unset, empty, 0 or false). */
export const IN_CI = !['', '0', 'false'].includes((process.env.CI ?? '').trim().toLowerCase())

/**
 * Options for `describe`/`test` that need a service: `{ skip: false }` when it
 * is there or in CI (the test then calls `require…` and fails if it is
 * missing), else `{ skip: 'SKIPPED: …' }`.
 */
function needs(available, why) {
  return { skip: available || IN_CI ? false : `SKIPPED: ${why}` }
}

export const PG_URL = (process.env.NANOKIT_TEST_PG_URL ?? '').trim()
const PG_WHY = 'needs NANOKIT_TEST_PG_URL (eval "$(bash scripts/pg-test-cluster.sh)")'

/** node:test options for a PostgreSQL test. */
export const needsPg = () => needs(Boolean(PG_URL), PG_WHY)

/** The PostgreSQL URL; throws (in CI, where the test is not skipped) when unset. */
export function requirePg() {
  if (!PG_URL) throw new Error(`CI is set, so PostgreSQL tests must run, but NANOKIT_TEST_PG_URL is not set: ${PG_WHY}`)
  return PG_URL
}

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'
const CHROMIUM_WHY = `needs ${CHROMIUM} (apt-get install -y chromium, or set CHROMIUM; .ci/run installs it)`

/** node:test options for a test that drives headless Chromium. */
export const needsChromium = () => needs(existsSync(CHROMIUM), CHROMIUM_WHY)

/** The Chromium executable; throws (in CI, where the test is not skipped) when missing. */
export function requireChromium() {
  if (!existsSync(CHROMIUM)) throw new Error(`CI is set, so the browser test must run, but Chromium is missing: ${CHROMIUM_WHY}`)
  return CHROMIUM
}

const DOCKER = (process.env.NANOKIT_TEST_DOCKER ?? '').trim() !== ''
const DOCKER_WHY = 'needs NANOKIT_TEST_DOCKER (eval "$(bash scripts/docker-test-env.sh)")'

/** node:test options for a test that drives the real Docker daemon. */
export const needsDocker = () => needs(DOCKER, DOCKER_WHY)

/** Throws (in CI, where the test is not skipped) when Docker is not usable. */
export function requireDocker() {
  if (!DOCKER) throw new Error(`CI is set, so the Docker tests must run, but ${DOCKER_WHY}`)
}
