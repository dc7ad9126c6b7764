// Times the e2b SDK against aether-api (docs/benchmarks.md):
//   - commands.run('true') from the SDK against the native API's exec
//     (POST /v1/vms/{id}/exec) of the same VM, interleaved, p50 and p99;
//   - Sandbox.create() to the first command's result.
//
//   E2B_API_URL=... E2B_SANDBOX_URL=... E2B_API_KEY=aek_... \
//   [BENCH_RUNS=200] [BENCH_CREATES=10] node bench.mjs
//
// The last line is a JSON object of the figures in milliseconds.
import { Sandbox } from 'e2b'
import { requireEnv } from './lib.mjs'

requireEnv('E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY')
const runs = Number(process.env.BENCH_RUNS ?? 200)
const creates = Number(process.env.BENCH_CREATES ?? 10)
const api = process.env.E2B_API_URL
const key = process.env.E2B_API_KEY

const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]
}
const ms = (x) => Math.round(x * 100) / 100
const time = async (fn) => {
  const t0 = performance.now()
  await fn()
  return performance.now() - t0
}

async function nativeExec(id, command = 'true', args = []) {
  const res = await fetch(`${api}/v1/vms/${id}/exec`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ command, args }),
  })
  const body = await res.json()
  if (res.status !== 200 || body.exit_code !== 0) throw new Error(`exec: ${res.status} ${JSON.stringify(body)}`)
}

const sbx = await Sandbox.create()
const sdk = []
const native = []
const nativeLogin = []
// The SDK runs every command in a login shell (bash -l -c, or sh -l -c
// where there is no bash): the native exec is timed both bare and so.
const shell = (await sbx.files.exists('/bin/bash')) ? '/bin/bash' : '/bin/sh'
try {
  for (let i = 0; i < 10; i++) { // warm every path up
    await sbx.commands.run('true')
    await nativeExec(sbx.sandboxId)
    await nativeExec(sbx.sandboxId, shell, ['-l', '-c', 'true'])
  }
  for (let i = 0; i < runs; i++) {
    sdk.push(await time(() => sbx.commands.run('true')))
    native.push(await time(() => nativeExec(sbx.sandboxId)))
    nativeLogin.push(await time(() => nativeExec(sbx.sandboxId, shell, ['-l', '-c', 'true'])))
  }
} finally {
  await sbx.kill()
}
console.log(`commands.run('true') x${runs}: p50 ${ms(pct(sdk, 50))} ms, p99 ${ms(pct(sdk, 99))} ms`)
console.log(`native exec 'true'   x${runs}: p50 ${ms(pct(native, 50))} ms, p99 ${ms(pct(native, 99))} ms`)
console.log(`native exec '${shell} -l -c true' x${runs}: p50 ${ms(pct(nativeLogin, 50))} ms, p99 ${ms(pct(nativeLogin, 99))} ms`)

const first = []
for (let i = 0; i < creates; i++) {
  let s
  first.push(await time(async () => {
    s = await Sandbox.create()
    await s.commands.run('true')
  }))
  await s.kill()
}
console.log(`Sandbox.create() to first result x${creates}: p50 ${ms(pct(first, 50))} ms, max ${ms(Math.max(...first))} ms`)
console.log(JSON.stringify({
  run_p50: ms(pct(sdk, 50)), run_p99: ms(pct(sdk, 99)),
  native_p50: ms(pct(native, 50)), native_p99: ms(pct(native, 99)),
  native_login_p50: ms(pct(nativeLogin, 50)), native_login_p99: ms(pct(nativeLogin, 99)),
  create_p50: ms(pct(first, 50)), create_max: ms(Math.max(...first)),
}))
