// Drives aether-api's E2B-compatible API with the unmodified e2b SDK.
//
//   E2B_API_URL=http://127.0.0.1:8080 E2B_SANDBOX_URL=http://127.0.0.1:8080 \
//   E2B_API_KEY=aek_... [E2B_OTHER_TENANT_KEY=aek_...] [E2B_CASES=core] node compat.mjs
//
// E2B_CASES=core runs only create, run, files write/read and kill (the
// qemu run). E2B_OTHER_TENANT_KEY is a key of another tenant, for the
// cross-tenant checks.
import {
  Sandbox, CommandExitError, AuthenticationError, SandboxNotFoundError, FileNotFoundError,
} from 'e2b'
import { assert, check, rejects, summary, requireEnv } from './lib.mjs'

requireEnv('E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY')
const core = process.env.E2B_CASES === 'core'
const otherKey = process.env.E2B_OTHER_TENANT_KEY
const runID = `r${Date.now()}`

let sbx
await check('Sandbox.create()', async () => {
  sbx = await Sandbox.create()
  assert.match(sbx.sandboxId, /^[0-9a-f-]{36}$/)
})
if (!sbx) {
  summary()
  process.exit()
}

await check('commands.run stdout', async () => {
  const r = await sbx.commands.run('echo hello')
  assert.equal(r.exitCode, 0)
  assert.equal(r.stdout, 'hello\n')
  assert.equal(r.stderr, '')
})

await check('files.write + files.read (text)', async () => {
  const info = await sbx.files.write('/tmp/e2b/hello.txt', 'hi there\n')
  assert.equal(info.path, '/tmp/e2b/hello.txt')
  assert.equal(info.name, 'hello.txt')
  assert.equal(await sbx.files.read('/tmp/e2b/hello.txt'), 'hi there\n')
})

if (!core) {
  await check('commands.run stderr', async () => {
    const r = await sbx.commands.run('echo oops >&2')
    assert.equal(r.stdout, '')
    assert.equal(r.stderr, 'oops\n')
  })

  await check('commands.run non-zero exit -> CommandExitError', async () => {
    await rejects(() => sbx.commands.run('echo partial; exit 7'), CommandExitError, (e) => {
      assert.equal(e.exitCode, 7)
      assert.equal(e.stdout, 'partial\n')
      assert.equal(e.error, 'exit status 7')
    })
  })

  await check('commands.run envs', async () => {
    const r = await sbx.commands.run('echo "$FOO-$BAR"', { envs: { FOO: 'foo', BAR: 'a b' } })
    assert.equal(r.stdout, 'foo-a b\n')
  })

  await check('commands.run cwd', async () => {
    const r = await sbx.commands.run('pwd', { cwd: '/tmp' })
    assert.equal(r.stdout, '/tmp\n')
  })

  await check("user: root by default, and user: 'root' given (Basic auth, username)", async () => {
    assert.equal((await sbx.commands.run('id -un')).stdout, 'root\n')
    assert.equal((await sbx.commands.run('id -un; pwd', { user: 'root' })).stdout, 'root\n/root\n')
    const info = await sbx.files.write('u.txt', 'u', { user: 'root' })
    assert.equal(info.path, '/root/u.txt')
    assert.equal(await sbx.files.read('u.txt', { user: 'root' }), 'u')
    assert.equal((await sbx.files.list('/root', { user: 'root' })).some((e) => e.name === 'u.txt'), true)
  })

  await check('commands.run onStdout/onStderr streaming', async () => {
    const chunks = []
    const errs = []
    const t0 = performance.now()
    let first
    const r = await sbx.commands.run('for i in 1 2 3; do echo $i; sleep 0.3; done; echo e >&2', {
      onStdout: (d) => { first ??= performance.now() - t0; chunks.push(d) },
      onStderr: (d) => errs.push(d),
    })
    const total = performance.now() - t0
    assert.equal(chunks.join(''), '1\n2\n3\n')
    assert.equal(errs.join(''), 'e\n')
    assert.equal(r.stdout, '1\n2\n3\n')
    assert.ok(chunks.length >= 2, `output came in ${chunks.length} chunk(s)`)
    assert.ok(total - first > 500, `first output ${first} ms, end ${total} ms: not streamed`)
  })

  await check('commands.run timeoutMs -> TimeoutError', async () => {
    const { TimeoutError } = await import('e2b')
    await rejects(() => sbx.commands.run('sleep 10', { timeoutMs: 1000 }), TimeoutError)
  })

  await check('commands.run background, list, kill', async () => {
    const h = await sbx.commands.run('sleep 60', { background: true, timeoutMs: 0 })
    assert.ok(h.pid > 0)
    const ps = await sbx.commands.list()
    const p = ps.find((x) => x.pid === h.pid)
    assert.ok(p, `pid ${h.pid} not in commands.list(): ${JSON.stringify(ps)}`)
    assert.deepEqual(p.args, ['-l', '-c', 'sleep 60'])
    assert.equal(await h.kill(), true)
    await rejects(() => h.wait(), CommandExitError, (e) => assert.equal(e.exitCode, -1))
    assert.equal(await sbx.commands.kill(h.pid), false, 'killing it again finds nothing')
  })

  await check('commands background: disconnect, connect, stdin', async () => {
    const h = await sbx.commands.run('read line; echo "got $line"', { background: true, stdin: true })
    await h.disconnect()
    const h2 = await sbx.commands.connect(h.pid)
    await sbx.commands.sendStdin(h.pid, 'abc\n')
    const r = await h2.wait()
    assert.equal(r.stdout, 'got abc\n')
  })

  await check('files.write + files.read (bytes)', async () => {
    const data = new Uint8Array([0, 1, 2, 250, 255, 10])
    await sbx.files.write('/tmp/e2b/data.bin', data)
    const got = await sbx.files.read('/tmp/e2b/data.bin', { format: 'bytes' })
    assert.deepEqual(Array.from(got), Array.from(data))
  })

  await check('files.write + files.read of 32 MiB (streamed both ways)', async () => {
    const { createHash } = await import('node:crypto')
    const data = new Uint8Array(32 << 20)
    for (let i = 0; i < data.length; i += 4096) data[i] = (i / 4096) & 0xff
    await sbx.files.write('/tmp/e2b/big.bin', data)
    const stream = await sbx.files.read('/tmp/e2b/big.bin', { format: 'stream' })
    const h = createHash('sha256')
    let n = 0
    for await (const chunk of stream) { h.update(chunk); n += chunk.length }
    assert.equal(n, data.length)
    assert.equal(h.digest('hex'), createHash('sha256').update(data).digest('hex'))
    await sbx.files.remove('/tmp/e2b/big.bin')
  })

  await check('files.write several files in one request', async () => {
    const infos = await sbx.files.write([
      { path: '/tmp/e2b/multi/a.txt', data: 'A' },
      { path: '/tmp/e2b/multi/b.txt', data: 'B' },
    ])
    assert.deepEqual(infos.map((i) => i.path), ['/tmp/e2b/multi/a.txt', '/tmp/e2b/multi/b.txt'])
    assert.equal(await sbx.files.read('/tmp/e2b/multi/b.txt'), 'B')
  })

  await check('files.write gzip (octet-stream)', async () => {
    await sbx.files.write('/tmp/e2b/gz.txt', 'zipped\n', { gzip: true })
    assert.equal(await sbx.files.read('/tmp/e2b/gz.txt'), 'zipped\n')
  })

  await check('files.list', async () => {
    const entries = await sbx.files.list('/tmp/e2b')
    const names = entries.map((e) => e.name).sort()
    assert.deepEqual(names, ['data.bin', 'gz.txt', 'hello.txt', 'multi'])
    const f = entries.find((e) => e.name === 'data.bin')
    assert.equal(f.type, 'file')
    assert.equal(f.size, 6)
    assert.equal(f.path, '/tmp/e2b/data.bin')
    assert.equal(entries.find((e) => e.name === 'multi').type, 'dir')
    const deep = await sbx.files.list('/tmp/e2b', { depth: 2 })
    assert.ok(deep.some((e) => e.path === '/tmp/e2b/multi/a.txt'), 'depth 2 lists multi/a.txt')
  })

  await check('files.exists', async () => {
    assert.equal(await sbx.files.exists('/tmp/e2b/hello.txt'), true)
    assert.equal(await sbx.files.exists('/tmp/e2b/nope.txt'), false)
  })

  await check('files.makeDir', async () => {
    assert.equal(await sbx.files.makeDir('/tmp/e2b/newdir/sub'), true)
    assert.equal(await sbx.files.makeDir('/tmp/e2b/newdir/sub'), false)
    const info = await sbx.files.getInfo('/tmp/e2b/newdir/sub')
    assert.equal(info.type, 'dir')
  })

  await check('files.rename', async () => {
    const info = await sbx.files.rename('/tmp/e2b/hello.txt', '/tmp/e2b/newdir/moved.txt')
    assert.equal(info.path, '/tmp/e2b/newdir/moved.txt')
    assert.equal(await sbx.files.exists('/tmp/e2b/hello.txt'), false)
    assert.equal(await sbx.files.read('/tmp/e2b/newdir/moved.txt'), 'hi there\n')
    await rejects(() => sbx.files.rename('/tmp/e2b/missing', '/tmp/e2b/x'), FileNotFoundError)
  })

  await check('files.remove', async () => {
    await sbx.files.remove('/tmp/e2b/newdir')
    assert.equal(await sbx.files.exists('/tmp/e2b/newdir'), false)
    await sbx.files.remove('/tmp/e2b/newdir') // a missing path is fine
  })

  await check('files.read missing -> FileNotFoundError', async () => {
    await rejects(() => sbx.files.read('/tmp/e2b/missing.txt'), FileNotFoundError)
  })

  await check('files relative path resolves to the home (root: /root)', async () => {
    const info = await sbx.files.write('rel.txt', 'r')
    assert.equal(info.path, '/root/rel.txt')
    assert.equal(await sbx.files.read('/root/rel.txt'), 'r')
  })

  await check('isRunning()', async () => {
    assert.equal(await sbx.isRunning(), true)
  })

  await check('getInfo()', async () => {
    const info = await sbx.getInfo()
    assert.equal(info.sandboxId, sbx.sandboxId)
    assert.equal(info.templateId, 'base')
    assert.equal(info.state, 'running')
    assert.ok(info.cpuCount >= 1)
    assert.equal(info.memoryMB, 512)
    const ttl = info.endAt.getTime() - info.startedAt.getTime()
    assert.ok(Math.abs(ttl - 300_000) < 5_000, `default timeout is 300 s, got ${ttl} ms`)
  })

  await check('setTimeout()', async () => {
    await sbx.setTimeout(60_000)
    const info = await sbx.getInfo()
    const left = info.endAt.getTime() - Date.now()
    assert.ok(left > 50_000 && left < 70_000, `endAt is ${left} ms away, want about 60 s`)
  })

  let sbx2
  await check('Sandbox.create() with metadata, envs and timeoutMs', async () => {
    sbx2 = await Sandbox.create({ metadata: { suite: 'e2b', run: runID }, envs: { GLOBAL_VAR: 'g1', FOO: 'global' }, timeoutMs: 120_000 })
    const r = await sbx2.commands.run('echo "$GLOBAL_VAR $FOO"', { envs: { FOO: 'local' } })
    assert.equal(r.stdout, 'g1 local\n', 'request envs win over the sandbox envs')
    const info = await sbx2.getInfo()
    assert.deepEqual(info.metadata, { suite: 'e2b', run: runID })
    const ttl = info.endAt.getTime() - info.startedAt.getTime()
    assert.ok(Math.abs(ttl - 120_000) < 5_000, `timeout 120 s, got ${ttl} ms`)
  })

  await check('Sandbox.create() with a metadata key labels cannot hold -> 400', async () => {
    const { SandboxError } = await import('e2b')
    await rejects(() => Sandbox.create({ metadata: { 'a b': 'x' } }), SandboxError, (e) => assert.match(e.message, /^400: metadata key "a b"/))
  })

  await check('Sandbox.create(template): size and env from a registered template', async () => {
    const t = await Sandbox.create('small', { timeoutMs: 60_000 })
    try {
      const info = await t.getInfo()
      assert.equal(info.templateId, 'small')
      assert.equal(info.cpuCount, 1)
      assert.equal(info.memoryMB, 256)
      assert.equal((await t.commands.run('echo $TPL_VAR')).stdout, 'from-template\n')
    } finally {
      await t.kill()
    }
    const { SandboxError } = await import('e2b')
    await rejects(() => Sandbox.create('no-such-template'), SandboxError, (e) => assert.match(e.message, /^400: template "no-such-template" is not registered/))
  })

  await check('Sandbox.list() with a metadata filter and paging', async () => {
    const p = Sandbox.list({ query: { metadata: { run: runID } } })
    const items = await p.nextItems()
    assert.deepEqual(items.map((i) => i.sandboxId), [sbx2.sandboxId])
    assert.deepEqual(items[0].metadata, { suite: 'e2b', run: runID })
    const all = []
    const pages = Sandbox.list({ limit: 1 })
    while (pages.hasNext) all.push(...await pages.nextItems())
    const ids = all.map((i) => i.sandboxId)
    assert.ok(ids.includes(sbx.sandboxId) && ids.includes(sbx2.sandboxId), `pages of 1 list both: ${ids}`)
    const running = await Sandbox.list({ query: { state: ['running'], metadata: { run: runID } } }).nextItems()
    assert.equal(running.length, 1)
    const paused = await Sandbox.list({ query: { state: ['paused'], metadata: { run: runID } } }).nextItems()
    assert.deepEqual(paused, [])
  })

  await check('Sandbox.connect()', async () => {
    const again = await Sandbox.connect(sbx2.sandboxId)
    const r = await again.commands.run('echo $GLOBAL_VAR')
    assert.equal(r.stdout, 'g1\n')
    assert.equal(await sbx2.files.exists('/tmp'), true, 'the first token still works')
  })

  await check('pause, then connect resumes with files and processes intact', async () => {
    await sbx2.files.write('/tmp/before-pause', 'kept')
    const bg = await sbx2.commands.run('sleep 1000', { background: true })
    assert.equal(await sbx2.pause(), true)
    const paused = await Sandbox.list({ query: { state: ['paused'], metadata: { run: runID } } }).nextItems()
    assert.deepEqual(paused.map((i) => i.sandboxId), [sbx2.sandboxId])
    assert.equal(await sbx2.pause(), false, 'pausing a paused sandbox answers 409, which the SDK reports as false')
    const again = await Sandbox.connect(sbx2.sandboxId)
    assert.equal(await again.files.read('/tmp/before-pause'), 'kept')
    const r = await again.commands.run(`kill -0 ${bg.pid} && echo alive`)
    assert.equal(r.stdout, 'alive\n')
  })

  await check("lifecycle onTimeout 'pause': the timeout pauses, connect resumes with files intact", async () => {
    // A long timeout first, so a slow host cannot reach it before the
    // file is written; then a short one.
    const ap = await Sandbox.create({ timeoutMs: 120000, lifecycle: { onTimeout: 'pause' }, metadata: { suite: 'e2b-autopause' } })
    try {
      assert.equal((await Sandbox.getInfo(ap.sandboxId)).lifecycle?.onTimeout, 'pause')
      await ap.files.write('/tmp/auto', 'kept')
      await ap.setTimeout(2000)
      const deadline = Date.now() + 30000
      let state
      while (Date.now() < deadline) {
        state = (await Sandbox.getInfo(ap.sandboxId)).state
        if (state === 'paused') break
        await new Promise((r) => setTimeout(r, 250))
      }
      assert.equal(state, 'paused', 'paused at its timeout, not killed')
      await new Promise((r) => setTimeout(r, 1500))
      assert.equal((await Sandbox.getInfo(ap.sandboxId)).state, 'paused', 'a paused sandbox does not time out')
      const again = await Sandbox.connect(ap.sandboxId, { timeoutMs: 60000 })
      assert.equal(await again.files.read('/tmp/auto'), 'kept')
      assert.equal((await Sandbox.getInfo(ap.sandboxId)).state, 'running')
    } finally {
      await Sandbox.kill(ap.sandboxId)
    }
  })

  await check('lifecycle keepMemory false or autoResume -> not supported, with the reason', async () => {
    await rejects(() => Sandbox.create({ lifecycle: { onTimeout: { action: 'pause', keepMemory: false } } }), Error,
      (e) => assert.match(e.message, /keepMemory/))
    await rejects(() => Sandbox.create({ lifecycle: { onTimeout: 'pause', autoResume: true } }), Error,
      (e) => assert.match(e.message, /autoResume/))
  })

  await check('a wrong API key -> AuthenticationError', async () => {
    const apiKey = 'aek_0123456789abcdef_' + 'x'.repeat(43)
    await rejects(() => Sandbox.create({ apiKey }), AuthenticationError)
    await rejects(() => Sandbox.list({ apiKey }).nextItems(), AuthenticationError)
  })

  await check('a wrong or missing access token -> 401', async () => {
    const base = process.env.E2B_SANDBOX_URL
    for (const headers of [{}, { 'X-Access-Token': 'wrong' }]) {
      const res = await fetch(new URL('/files?path=%2Fetc%2Fhostname', base), { headers: { 'E2b-Sandbox-Id': sbx2.sandboxId, ...headers } })
      assert.equal(res.status, 401)
    }
  })

  if (otherKey) {
    await check("another tenant's sandbox -> not found", async () => {
      await rejects(() => Sandbox.getInfo(sbx2.sandboxId, { apiKey: otherKey }), SandboxNotFoundError)
      await rejects(() => Sandbox.connect(sbx2.sandboxId, { apiKey: otherKey }), SandboxNotFoundError)
      assert.equal(await Sandbox.kill(sbx2.sandboxId, { apiKey: otherKey }), false)
      const items = await Sandbox.list({ apiKey: otherKey, query: { metadata: { run: runID } } }).nextItems()
      assert.deepEqual(items, [])
      assert.equal(await sbx2.isRunning(), true, 'still running')
    })
  } else {
    console.log('FAIL another tenant: E2B_OTHER_TENANT_KEY is not set')
    process.exitCode = 1
  }

  if (sbx2) await Sandbox.kill(sbx2.sandboxId)
}

await check('kill()', async () => {
  assert.equal(await sbx.kill(), true)
  assert.equal(await Sandbox.kill(sbx.sandboxId), false, 'a second kill finds nothing')
  if (!core) {
    assert.equal(await sbx.isRunning(), false)
    await rejects(() => sbx.commands.run('true'), SandboxNotFoundError)
    await rejects(() => Sandbox.getInfo(sbx.sandboxId), SandboxNotFoundError)
  }
})

summary()
