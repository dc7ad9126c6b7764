// A tiny harness: each check prints one line, and summary() prints
// "N passed, N failed" and sets a non-zero exit code on failure.
import assert from 'node:assert/strict'

let passed = 0
let failed = 0

export { assert }

export async function check(name, fn) {
  const t0 = performance.now()
  try {
    await fn()
    passed++
    console.log(`ok   ${name} (${Math.round(performance.now() - t0)} ms)`)
  } catch (err) {
    failed++
    console.log(`FAIL ${name}: ${err?.name}: ${err?.message}`)
  }
}

// rejects runs fn and checks that it throws an instance of cls; more can
// check the error further.
export async function rejects(fn, cls, more) {
  let err
  try {
    await fn()
  } catch (e) {
    err = e
  }
  assert.ok(err, `expected ${cls.name}, nothing was thrown`)
  assert.ok(err instanceof cls, `expected ${cls.name}, got ${err?.name}: ${err?.message}`)
  if (more) more(err)
}

export function summary() {
  console.log(`${passed} passed, ${failed} failed`)
  if (failed > 0) process.exitCode = 1
}

export function requireEnv(...names) {
  for (const n of names) {
    if (!process.env[n]) {
      console.log(`FAIL environment: ${n} is not set`)
      console.log('0 passed, 1 failed')
      process.exit(1)
    }
  }
}
