// The hub's page. No framework and no build step: the DOM is made with
// createElement, and every string from services, logs, traces and state is
// set as text (textContent), never parsed as HTML. The view comes from one
// server-sent event stream (/api/events): the whole view, then the sections
// that changed; EventSource reconnects by itself and the server then sends
// the whole view again. Actions are POSTs carrying the token header.
'use strict'

const TOKEN = document.querySelector('meta[name="nk-token"]').content
const view = { version: 0, sections: {} }
const $ = (id) => document.getElementById(id)

/** An element: `el('td', { class: 'x', data: { service: 'a' } }, 'text', child…)`. */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag)
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue
    if (k === 'class') e.className = v
    else if (k === 'data') for (const [dk, dv] of Object.entries(v)) { if (dv != null) e.dataset[dk] = String(dv) }
    else if (k === 'on') for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn)
    else if (k === 'style') Object.assign(e.style, v)
    else if (k === 'href') e.setAttribute('href', String(v).startsWith('#') ? v : '#')
    else e.setAttribute(k, v === true ? '' : String(v))
  }
  add(e, children)
  return e
}

function add(parent, children) {
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue
    parent.append(c instanceof Node ? c : document.createTextNode(String(c)))
  }
}

function clear(node, ...children) {
  node.replaceChildren()
  add(node, children)
  return node
}

// ---- times ------------------------------------------------------------------

function ago(ms) {
  if (ms == null) return ''
  let s = Math.max(0, Math.round((Date.now() - ms) / 1000))
  return dur(s * 1000)
}

function dur(ms) {
  if (ms == null) return ''
  if (ms < 1000) return `${Math.round(ms)}ms`
  let s = Math.round(ms / 1000)
  if (s < 60) return `${(ms / 1000).toFixed(s < 10 ? 1 : 0)}s`
  const d = Math.floor(s / 86400); s -= d * 86400
  const h = Math.floor(s / 3600); s -= h * 3600
  const m = Math.floor(s / 60); s -= m * 60
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s}s`
}

function when(ms) {
  return ms == null ? '' : new Date(ms).toLocaleString()
}

/** A length of time in words, its largest unit and the next: `30 days`, `1 hour 30 minutes`. */
function span(ms) {
  let s = Math.round(ms / 1000)
  const parts = []
  for (const [unit, len] of [['day', 86400], ['hour', 3600], ['minute', 60], ['second', 1]]) {
    const n = Math.floor(s / len)
    s -= n * len
    if (parts.length === 2 || (!n && parts.length === 0)) continue
    if (n) parts.push(`${n} ${unit}${n === 1 ? '' : 's'}`)
    else parts.push(null)
  }
  return parts.filter(Boolean).join(' ') || '0 seconds'
}

/** A size as `nanokit repo status` prints it: `512 B`, `1.2 kB`, `3.4 MB` (powers of 1000). */
function bytes(n) {
  const units = ['B', 'kB', 'MB', 'GB', 'TB']
  let v = n
  let u = 0
  while (v >= 1000 && u < units.length - 1) { v /= 1000; u++ }
  return u ? `${v.toFixed(1)} ${units[u]}` : `${n} B`
}

/**
 * A field of a JSON report in words, by its name's unit: `olderThanMs` 2592000000 →
 * ['older than', '30 days'], `storeBytes` 1234567 → ['store bytes', '1.2 MB'], `lastUsedAtMs` →
 * a time ago, a list → its length, a ratio → two decimals.
 */
function field(key, v) {
  const words = key.replace(/([a-z0-9])([A-Z])/g, '$1 $2').toLowerCase()
  if (Array.isArray(v)) return [words, `${v.length}`]
  if (typeof v !== 'number') return [words, String(v)]
  if (/AtMs$/.test(key)) return [words.replace(/ at ms$/, ''), age(v)]
  if (/Ms$/.test(key)) return [words.replace(/ ms$/, ''), span(v)]
  if (/Bytes$/.test(key)) return [words, bytes(v)]
  return [words, Number.isInteger(v) ? `${v}` : v.toFixed(2)]
}

/** A span that shows the time since/until `ms` and keeps it current. */
function age(ms, { until = false, prefix = '' } = {}) {
  const s = el('span', { class: 'age', data: { ms, until: until ? 1 : 0, prefix }, title: when(ms) })
  tickOne(s)
  return s
}

function tickOne(s) {
  const ms = Number(s.dataset.ms)
  if (!ms) return
  const left = ms - Date.now()
  s.textContent = s.dataset.prefix + (s.dataset.until === '1' ? (left > 0 ? `in ${dur(left)}` : 'now') : ago(ms))
}

setInterval(() => document.querySelectorAll('.age').forEach(tickOne), 1000)

function badge(text, cls) {
  const k = String(cls ?? text).toLowerCase().replace(/[^a-z0-9]+/g, '-')
  return el('span', { class: `badge s-${k}` }, text)
}

// ---- notices, confirmation, actions ------------------------------------------

function notice(text, kind = '', sticky = kind === 'bad') {
  const n = el('div', { class: `notice ${kind}` })
  const close = el('button', { type: 'button', on: { click: () => n.remove() } }, '×')
  add(n, [close, text])
  $('notices').append(n)
  if (!sticky) setTimeout(() => n.remove(), 6000)
  return n
}

function confirmAction(text) {
  return new Promise((resolve) => {
    const m = $('modal')
    $('modal-text').textContent = text
    m.hidden = false
    const done = (v) => {
      m.hidden = true
      $('modal-ok').onclick = $('modal-cancel').onclick = null
      resolve(v)
    }
    $('modal-ok').onclick = () => done(true)
    $('modal-cancel').onclick = () => done(false)
  })
}

async function act(name, body, { confirm } = {}) {
  if (confirm) {
    if (!(await confirmAction(confirm))) return null
    body = { ...body, confirm: true }
  }
  let r, data
  try {
    r = await fetch(`/api/actions/${name}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-nanokit-token': TOKEN },
      body: JSON.stringify(body),
    })
    data = await r.json()
  } catch (e) {
    notice(`${name} failed: ${e}`, 'bad')
    return null
  }
  if (r.ok && data.ok !== false) {
    notice(`${name}: ${data.message ?? 'done'}${data.trace?.run ? ` (run ${data.trace.run})` : ''}`, 'ok')
  } else {
    notice(`${name} refused: ${data.code ?? r.status}: ${data.message ?? ''}`, 'bad')
  }
  return data
}

// ---- live view -----------------------------------------------------------------

let events
function connect() {
  events = new EventSource('/api/events')
  events.addEventListener('view', (e) => {
    const v = JSON.parse(e.data)
    view.version = v.version
    view.sections = v.sections
    setConn(true)
    renderAll()
  })
  events.addEventListener('patch', (e) => {
    const v = JSON.parse(e.data)
    view.version = v.version
    Object.assign(view.sections, v.sections)
    for (const name of Object.keys(v.sections)) render(name)
  })
  events.onopen = () => setConn(true)
  events.onerror = () => setConn(false)
}

function setConn(up) {
  const c = $('conn')
  c.className = `conn ${up ? 'live' : 'down'}`
  c.textContent = up ? 'live' : 'reconnecting…'
  document.body.dataset.connected = up ? '1' : '0'
}

const renderers = {}
function render(name) {
  document.body.dataset.version = view.version
  if (name === 'meta') renderMeta()
  if (name === 'activity') renderActivity()
  if (name === 'services' || name === 'activity' || name === 'runs') renderers.services?.()
  if (name === 'runs') renderers.runs?.()
  if (name === 'locks') renderers.locks?.()
  if (name === 'state') renderers.state?.()
  if (name === 'drift') renderers.drift?.()
  if (name === 'services' || name === 'meta') renderers.logsBar?.()
}

function renderAll() {
  for (const n of ['meta', 'activity', 'services', 'runs', 'locks', 'state', 'drift']) render(n)
}

function renderMeta() {
  const m = view.sections.meta || {}
  $('project').textContent = m.project ? `· ${m.project}` : ''
  document.title = `nanokit hub · ${m.project ?? ''}`
  // A nanokit.yml that no longer loads: said until it loads again (the last good one stays shown).
  clear($('config-errors'), (m.errors || []).map((e) => el('div', { class: 'alert' }, `nanokit.yml (${e.env}) does not load; the hub shows it as it last loaded. ${e.error.code}: ${e.error.message}`)))
}

function renderActivity() {
  const a = view.sections.activity || { running: [] }
  const box = clear($('activity'))
  for (const r of a.running) {
    const phases = Object.entries(r.phases || {}).map(([s, p]) => `${s}: ${p.phase}${p.message ? ` (${p.message})` : ''}`)
    add(box, [el('div', { data: { action: r.action } }, el('b', {}, `${r.action} (${r.env}) running`), ' ', age(r.startedAtMs, { prefix: 'for ' }), phases.length ? ` · ${phases.join(' · ')}` : '')])
  }
}

// ---- tabs ------------------------------------------------------------------------

function route() {
  const [tab, ...rest] = (location.hash.slice(1) || 'services').split('/')
  const arg = rest.length ? decodeURIComponent(rest.join('/')) : null
  for (const a of document.querySelectorAll('#tabs a')) a.classList.toggle('active', a.dataset.tab === tab)
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== `view-${tab}`
  document.body.dataset.tab = tab
  if (tab === 'runs') openRun(arg)
  if (tab === 'logs') openLogs(arg)
}
window.addEventListener('hashchange', route)

// ---- services ----------------------------------------------------------------------

/** RFC 3339 → milliseconds since the epoch (null when absent). */
const ms = (t) => (t ? Date.parse(t) : null)

/** Whether a watcher's event concerns `name`: as its service, a dependent it released, a drift found in it, a request naming it (not its many progress lines: the status shows the phase). */
function concerns(ev, name) {
  switch (ev.type) {
    case 'dependentsReleased': return ev.service === name || ev.dependents.includes(name)
    case 'driftFound': return ev.items.some((d) => d.service === name)
    case 'request': return ev.services.includes(name)
    case 'progress': return false
    default: return ev.service === name
  }
}

/** The newest run of `env` that touched `name`: its name, command, start and the error it failed with (null when it went well). */
function lastRunOf(env, name) {
  const r = (view.sections.runs?.runs || []).find((r) => r.env === env && r.services && name in r.services)
  return r ? { run: r.run, command: r.command, startedAtMs: r.startedAtMs, error: r.services[name] } : null
}

/**
 * One environment's services as the page draws them, put together from what the hub sends: the rows
 * of `nanokit status`, the configured services and graph, the progress of hub actions, the watcher's
 * status and events as it writes them, and the runs.
 */
function shapeEnv(e) {
  const rows = Object.fromEntries(e.rows.map((r) => [r.service, r]))
  const conf = Object.fromEntries(e.config.map((c) => [c.name, c]))
  const up = (n) => !!rows[n]?.alive && rows[n].status === 'healthy'
  const w = e.watch
  const events = (w?.events || []).map((ev) => ({ ...ev, atMs: ms(ev.at) }))
  const services = [...new Set([...e.layers.flat(), ...e.rows.map((r) => r.service)])].map((name) => {
    const r = rows[name]
    const c = conf[name]
    const phase = e.phases[name] ?? null
    const dependsOn = c?.dependsOn || []
    const sw = w?.status.services?.[name]
    return {
      name, inConfig: !!c, deployed: !!r, status: r ? r.status : 'not deployed', alive: !!r?.alive, running: r?.running ?? 0,
      instances: r?.instances || [], pid: r?.pid ?? null, port: c?.port ?? null, image: c?.image ?? null, sinceMs: ms(r?.updated_at),
      error: r?.error ?? null, dependsOn, waitingOn: up(name) && !phase ? [] : dependsOn.filter((d) => !up(d)), phase,
      watch: sw ? { ...sw, lastExit: sw.lastExit && { ...sw.lastExit, atMs: ms(sw.lastExit.at) }, nextRestartAtMs: ms(sw.nextAttempt), recent: events.filter((ev) => concerns(ev, name)).slice(-5) } : null,
      lastRun: lastRunOf(e.env, name),
    }
  })
  const st = w?.status
  const watch = w && { running: w.running, pid: st.leader.pid, host: st.leader.host, epoch: st.leader.epoch, lastPass: st.lastPass && { ...st.lastPass, atMs: ms(st.lastPass.finishedAt) }, nextCheckAtMs: ms(st.nextFullCheck), events }
  return { env: e.env, project: e.project, provider: e.provider, layers: e.layers, services, watch, error: e.error }
}

const envs = () => (view.sections.services || []).map(shapeEnv)

function stateOf(s) {
  if (s.phase && !['healthy', 'unchanged', 'deleted', 'stopped', 'failed', 'skipped', 'cancelled'].includes(s.phase.phase)) {
    return s.phase.phase === 'waiting' ? 'waiting' : 'starting'
  }
  if (s.watch?.nextRestartAtMs && s.watch.nextRestartAtMs > Date.now() - 1000 && !s.alive) return 'restarting'
  return s.status
}

renderers.services = () => {
  const root = $('view-services')
  const shown = envs()
  const wasOpen = {}
  for (const d of root.querySelectorAll('details[data-env]')) wasOpen[d.dataset.env] = d.open
  clear(root)
  const down = []
  for (const env of shown) {
    for (const s of env.services) if (s.deployed && !s.alive && s.status !== 'stopped') down.push(`${s.name} (${env.env}) is ${s.status}${s.error ? `: ${s.error.split('\n')[0]}` : ''}`)
  }
  if (down.length) root.append(el('div', { class: 'alert', id: 'down-alert' }, down.join('\n')))
  for (const env of shown) root.append(envGroup(env, wasOpen[env.env] ?? true))
  requestAnimationFrame(drawEdges)
}

function envGroup(env, open) {
  const d = el('details', { class: 'panel', data: { env: env.env }, open })
  const w = env.watch
  const watchLine = w
    ? el('span', { class: 'muted', id: `watch-${env.env}` },
        w.running ? 'watcher running' : 'watcher stopped',
        w.pid ? ` · pid ${w.pid}` : '', w.host ? ` on ${w.host}` : '',
        w.epoch != null ? ` · epoch ${w.epoch}` : '',
        w.lastPass?.atMs ? [' · last pass ', age(w.lastPass.atMs), ' ago', w.lastPass.outcome ? ` (${w.lastPass.outcome})` : ''] : '',
        w.nextCheckAtMs ? [' · next full check ', age(w.nextCheckAtMs, { until: true })] : '')
    : el('span', { class: 'muted' }, 'no watcher (changes seen by polling)')
  add(d, [el('summary', { class: 'envbar' },
    el('b', {}, `environment ${env.env}`), el('span', { class: 'muted' }, `${env.project} · ${env.provider}`), watchLine, el('span', { class: 'grow' }),
    el('button', { type: 'button', class: 'primary', data: { act: 'up', env: env.env }, on: { click: (e) => { e.preventDefault(); act('up', { env: env.env }) } } }, 'Up'),
    el('button', { type: 'button', data: { act: 'down', env: env.env }, on: { click: (e) => { e.preventDefault(); act('down', { env: env.env }, { confirm: `Stop and remove every service of ${env.project} (${env.env})?` }) } } }, 'Down'))])
  if (env.error) d.append(el('div', { class: 'alert' }, `${env.error.code}: ${env.error.message}`))
  d.append(graph(env))
  d.append(serviceTable(env))
  return d
}

function graph(env) {
  const byName = Object.fromEntries(env.services.map((s) => [s.name, s]))
  const g = el('div', { class: 'graph', data: { env: env.env } })
  for (const layer of env.layers) {
    const col = el('div', { class: 'layer' })
    for (const name of layer) {
      const s = byName[name] || { name, status: 'not deployed' }
      const st = stateOf(s)
      col.append(el('div', { class: `node s-${st.replace(/ /g, '-')}`, data: { node: name, deps: (s.dependsOn || []).join('\n') }, title: `${name}: ${st}` }, name, el('small', {}, st)))
    }
    g.append(col)
  }
  return g
}

function drawEdges() {
  for (const g of document.querySelectorAll('.graph')) {
    g.querySelector('svg')?.remove()
    const box = g.getBoundingClientRect()
    const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg')
    svg.setAttribute('width', g.scrollWidth)
    svg.setAttribute('height', g.scrollHeight)
    for (const n of g.querySelectorAll('.node')) {
      const to = n.getBoundingClientRect()
      for (const dep of (n.dataset.deps || '').split('\n').filter(Boolean)) {
        const from = g.querySelector(`.node[data-node="${CSS.escape(dep)}"]`)
        if (!from) continue
        const f = from.getBoundingClientRect()
        const x1 = f.right - box.left + g.scrollLeft, y1 = f.top + f.height / 2 - box.top
        const x2 = to.left - box.left + g.scrollLeft, y2 = to.top + to.height / 2 - box.top
        const p = document.createElementNS('http://www.w3.org/2000/svg', 'path')
        const mx = (x1 + x2) / 2
        p.setAttribute('d', `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`)
        p.setAttribute('fill', 'none')
        p.setAttribute('stroke', '#94a3b8')
        p.setAttribute('stroke-width', '2')
        svg.append(p)
      }
    }
    g.prepend(svg)
  }
}
window.addEventListener('resize', () => requestAnimationFrame(drawEdges))

function serviceTable(env) {
  const t = el('table', { class: 'services', data: { env: env.env } },
    el('tr', {}, ['Service', 'Status', 'Health', 'PID / container', 'Port', 'Up', 'Restarts', 'Next restart', 'Waiting on', 'Last error', ''].map((h) => el('th', {}, h))))
  for (const s of env.services) {
    const st = stateOf(s)
    const w = s.watch || {}
    const inst = s.pid != null ? `pid ${s.pid}` : (s.instances || []).map((i) => i.slice(0, 12)).join(', ')
    const health = w.health != null ? (typeof w.health === 'object' ? (w.health.status ?? JSON.stringify(w.health)) : String(w.health))
      : s.alive && s.status === 'healthy' ? 'healthy' : s.deployed ? (s.alive ? 'not yet' : '—') : ''
    const exit = w.lastExit == null ? '' : typeof w.lastExit === 'object' ? (w.lastExit.text ?? JSON.stringify(w.lastExit)) : String(w.lastExit)
    const lastError = s.error || (exit ? `last exit: ${exit}` : '') ||
      (s.lastRun?.error ? `${s.lastRun.command} failed: ${s.lastRun.error}` : '')
    const waiting = (s.waitingOn || []).map((x) => el('button', { type: 'button', class: 'linkish', on: { click: () => flash(env.env, x) } }, x))
    const phase = s.phase ? ` · ${s.phase.phase}${s.phase.message ? `: ${s.phase.message}` : ''}` : ''
    t.append(el('tr', { data: { service: s.name, status: st, pid: s.pid, instances: (s.instances || []).join(' '), restarts: w.restarts, phase: s.phase?.phase } },
      el('td', {}, el('b', {}, s.name), s.inConfig ? '' : el('span', { class: 'muted' }, ' (not in config)')),
      el('td', { class: 'status' }, badge(st), el('span', { class: 'muted' }, phase)),
      el('td', { class: 'health' }, health),
      el('td', { class: 'pid mono' }, inst, s.running > 1 ? ` (${s.running} running)` : ''),
      el('td', { class: 'port' }, s.port ?? ''),
      el('td', { class: 'uptime' }, s.alive && s.sinceMs ? age(s.sinceMs) : ''),
      el('td', { class: 'restarts num' }, w.restarts ?? ''),
      el('td', { class: 'next-restart' }, w.nextRestartAtMs && w.nextRestartAtMs > Date.now() - 1000 ? age(w.nextRestartAtMs, { until: true }) : ''),
      el('td', { class: 'waiting' }, waiting.length ? ['waiting on ', waiting.flatMap((b, i) => (i ? [', ', b] : [b]))] : ''),
      el('td', { class: 'error err' }, lastError.split('\n').slice(0, 3).join('\n')),
      el('td', {}, s.inConfig ? el('button', { type: 'button', data: { act: 'restart', service: s.name }, on: { click: () => act('restart', { env: env.env, service: s.name }) } }, 'Restart') : '')))
    for (const ev of w.recent || []) {
      t.append(el('tr', { class: 'event', data: { event: ev.type, of: s.name } }, el('td', {}), el('td', { class: 'muted', colspan: 10 }, eventText(ev))))
    }
  }
  return t
}

// A watcher's event as Nomad lists a task's: when, then what (`restarting in 27.7 s (attempt 2)`).
function eventText(ev) {
  return [ev.atMs ? [age(ev.atMs), ' ago · '] : '', ev.text ?? ev.type]
}

function flash(env, name) {
  const row = document.querySelector(`table.services[data-env="${CSS.escape(env)}"] tr[data-service="${CSS.escape(name)}"]`)
  if (!row) return
  row.scrollIntoView({ block: 'center' })
  row.classList.remove('flash')
  void row.offsetWidth
  row.classList.add('flash')
}

// ---- runs --------------------------------------------------------------------------

let openRunName = null
renderers.runs = () => {
  if (openRunName) return
  const root = clear($('view-runs'))
  const r = view.sections.runs || { runs: [] }
  root.append(el('h2', {}, 'Runs ', el('span', { class: 'muted' }, '(newest first)')))
  const t = el('table', { class: 'runs' }, el('tr', {}, ['Started', 'Command', 'Env', 'Outcome', 'Duration', 'Spans', 'Run'].map((h) => el('th', {}, h))))
  for (const x of r.runs) {
    t.append(el('tr', { data: { run: x.run } },
      el('td', {}, when(x.startedAtMs)),
      el('td', {}, x.command ?? ''),
      el('td', {}, x.env ?? ''),
      el('td', {}, badge(x.outcome ?? 'unreadable', x.outcome === 'ok' ? 'ok' : 'failed'), x.error ? el('div', { class: 'err' }, x.error) : ''),
      el('td', { class: 'num' }, dur(x.durationMs)),
      el('td', { class: 'num' }, x.spans ?? ''),
      el('td', {}, el('a', { href: `#runs/${encodeURIComponent(x.run)}`, class: 'mono' }, x.run))))
  }
  if (!r.runs.length) t.append(el('tr', {}, el('td', { colspan: 7, class: 'muted' }, 'No runs yet: every up, down, restart and watch pass records one.')))
  root.append(t)
}

async function openRun(name) {
  openRunName = name
  if (!name) return renderers.runs()
  const root = clear($('view-runs'), el('p', { class: 'muted' }, 'loading…'))
  const r = await fetch(`/api/runs/${encodeURIComponent(name)}`)
  const d = await r.json()
  if (openRunName !== name) return
  if (!r.ok) return clear(root, el('a', { href: '#runs' }, '← all runs'), el('p', { class: 'err' }, `${d.code}: ${d.message}`))
  timeline(root, d)
}

function timeline(root, d) {
  const t = d.trace
  const total = Math.max(1, (t.end_unix_nano - t.start_unix_nano) / 1e6)
  const crit = new Set(d.critical)
  const byId = Object.fromEntries(t.spans.map((s) => [s.span_id, s]))
  const depth = (s) => (s.parent_span_id && byId[s.parent_span_id] ? 1 + depth(byId[s.parent_span_id]) : 0)
  const rootId = t.spans.find((s) => !s.parent_span_id)?.span_id
  clear(root,
    el('a', { href: '#runs' }, '← all runs'),
    el('h2', {}, `nanokit ${t.command} · ${t.project ?? ''} (${t.env}) `, badge(t.outcome === 'ok' ? 'ok' : 'failed', t.outcome === 'ok' ? 'ok' : 'failed')),
    el('div', { class: 'muted' }, `started ${when(t.start_unix_nano / 1e6)} · ${dur(total)} · ${t.spans.length} spans · trace `, el('code', {}, t.trace_id)),
    el('div', { class: 'legend' },
      el('span', {}, el('i', { style: { background: 'var(--svc)' } }), 'service'),
      el('span', {}, el('i', { style: { background: 'var(--blue)' } }), 'step'),
      el('span', {}, el('i', { style: { background: 'var(--wait)' } }), 'waiting'),
      el('span', {}, el('i', { style: { background: 'var(--bad)' } }), 'failed'),
      el('span', {}, el('i', { style: { boxShadow: '0 0 0 2px #111827' } }), 'critical path')))
  const chart = el('div', { class: 'chart', id: 'chart' })
  const waits = new Set(['dependencies', 'lock.wait', 'deploy_lock', 'concurrency'])
  // Tree order: parents first, children by start.
  const kids = {}
  for (const s of t.spans) (kids[s.parent_span_id ?? ''] ||= []).push(s)
  const order = []
  const walk = (id) => { for (const s of (kids[id] || []).sort((a, b) => a.start_unix_nano - b.start_unix_nano)) { order.push(s); walk(s.span_id) } }
  walk('')
  for (const s of order) {
    const left = ((s.start_unix_nano - t.start_unix_nano) / 1e6 / total) * 100
    const width = Math.max(0, ((s.end_unix_nano - s.start_unix_nano) / 1e6 / total) * 100)
    const cls = ['bar', s.span_id === rootId ? 'root' : s.name === 'service' ? 'service' : waits.has(s.name) ? 'wait' : 'step']
    if (s.status === 'error') cls.push('failed')
    if (crit.has(s.span_id)) cls.push('critical')
    const label = s.span_id === rootId ? `nanokit ${t.command}` : s.name === 'service' ? (s.attributes['nanokit.service'] ?? 'service') : s.name
    const tip = `${d.labels[s.span_id] ?? s.name} — ${dur((s.end_unix_nano - s.start_unix_nano) / 1e6)}${s.attributes.error ? `\n${s.attributes.error}` : ''}`
    chart.append(el('div', { class: `trow${s.name === 'service' ? ' service' : ''}` },
      el('div', { class: 'tlabel', style: { paddingLeft: `${8 + depth(s) * 16}px` } }, label, el('span', { class: 'dur' }, dur((s.end_unix_nano - s.start_unix_nano) / 1e6))),
      el('div', { class: 'track' }, el('div', { class: cls.join(' '), title: tip, data: { spanId: s.span_id, name: s.name }, style: { left: `${left}%`, width: `${width}%` } }))))
  }
  root.append(chart)
  root.append(el('h3', {}, 'Slowest steps'))
  const st = el('table', { id: 'slowest' }, el('tr', {}, el('th', {}, 'Duration'), el('th', {}, 'Step'), el('th', {}, '')))
  for (const s of d.slowest) {
    st.append(el('tr', { data: { spanId: s.spanId } }, el('td', { class: 'num' }, dur(s.durationMs)), el('td', {}, s.label), el('td', {}, s.critical ? badge('critical path', 'waiting') : '', s.failed ? badge('failed') : '')))
  }
  root.append(st)
  const failed = t.spans.filter((s) => s.status === 'error' && s.name !== 'service' && s.span_id !== rootId)
  if (failed.length) {
    root.append(el('h3', {}, 'Failures'))
    for (const s of failed) root.append(el('div', {}, el('b', {}, d.labels[s.span_id] ?? s.name), el('pre', { class: 'err' }, s.attributes.error ?? s.status_message ?? '')))
  }
}

// ---- logs ----------------------------------------------------------------------------

const logState = { src: null, env: null, service: '*', lines: [], follow: true, filter: '' }
const MAX_LOG_LINES = 5000

renderers.logsBar = () => {
  if (document.body.dataset.tab === 'logs') ensureLogsUi()
}

function ensureLogsUi() {
  const root = $('view-logs')
  if (!root.querySelector('.logbar')) {
    const envSel = el('select', { id: 'log-env', on: { change: () => { logState.env = envSel.value; startLogs() } } })
    const svcSel = el('select', { id: 'log-service', on: { change: () => { location.hash = `#logs/${encodeURIComponent(svcSel.value)}` } } })
    const filter = el('input', { id: 'log-filter', type: 'search', placeholder: 'filter (search as you type)', on: { input: () => { logState.filter = filter.value; drawLog() } } })
    const follow = el('input', { id: 'log-follow', type: 'checkbox', checked: true, on: { change: () => { logState.follow = follow.checked } } })
    const whole = el('button', { type: 'button', id: 'log-search', on: { click: searchLogs } }, 'Search whole logs')
    add(root, [el('div', { class: 'logbar' }, envSel, svcSel, filter, whole, el('label', {}, follow, ' follow'), el('span', { id: 'log-note', class: 'muted' })),
      el('div', { class: 'log', id: 'log' }), el('div', { id: 'log-results' })])
  }
  const shown = envs()
  const names = shown.map((e) => e.env)
  const envSel = $('log-env')
  if (envSel.options.length !== names.length) clear(envSel, names.map((e) => el('option', { value: e }, e)))
  if (!logState.env) logState.env = names[0]
  envSel.value = logState.env ?? ''
  const env = shown.find((e) => e.env === logState.env)
  const svcSel = $('log-service')
  const services = ['*', ...(env?.services || []).map((s) => s.name)]
  if ([...svcSel.options].map((o) => o.value).join('\n') !== services.join('\n')) {
    clear(svcSel, services.map((n) => el('option', { value: n }, n === '*' ? 'all services' : n)))
  }
  svcSel.value = logState.service
  const s = env?.services.find((x) => x.name === logState.service)
  $('log-note').textContent = s && !s.alive ? `${s.name} is ${s.status}: its last lines` : ''
}

function openLogs(service) {
  logState.service = service || '*'
  ensureLogsUi()
  startLogs()
}

function startLogs() {
  logState.src?.close()
  logState.lines = []
  drawLog()
  const q = new URLSearchParams({ env: logState.env ?? '', service: logState.service })
  const src = new EventSource(`/api/logs?${q}`)
  logState.src = src
  src.addEventListener('lines', (e) => {
    const d = JSON.parse(e.data)
    if (d.first) logState.lines = []
    logState.lines.push(...d.lines)
    if (logState.lines.length > MAX_LOG_LINES) logState.lines.splice(0, logState.lines.length - MAX_LOG_LINES)
    drawLog()
  })
}

function drawLog() {
  const box = $('log')
  if (!box) return
  const f = logState.filter.toLowerCase()
  const lines = f ? logState.lines.filter(([, t]) => t.toLowerCase().includes(f)) : logState.lines
  const frag = document.createDocumentFragment()
  for (const [s, t] of lines) frag.append(el('div', { class: 'l', data: { service: s } }, el('span', { class: 'svc' }, s), t))
  box.replaceChildren(frag)
  box.dataset.count = lines.length
  if (logState.follow) box.scrollTop = box.scrollHeight
}

async function searchLogs() {
  const q = $('log-filter').value.trim()
  const out = clear($('log-results'))
  if (!q) return out.append(el('p', { class: 'muted' }, 'type what to search for first'))
  const r = await fetch(`/api/logs/search?${new URLSearchParams({ env: logState.env ?? '', service: logState.service, q })}`)
  const d = await r.json()
  if (!r.ok) return out.append(el('p', { class: 'err' }, `${d.code}: ${d.message}`))
  out.append(el('h3', {}, `${d.matches.length}${d.truncated ? '+' : ''} match(es) in the whole logs`))
  const box = el('div', { class: 'log', style: { height: 'auto', maxHeight: '40vh' } })
  for (const [s, t] of d.matches) box.append(el('div', { class: 'l hit-line' }, el('span', { class: 'svc' }, s), t))
  out.append(box)
}

// ---- locks and the shared repo ----------------------------------------------------------

renderers.locks = () => {
  const root = clear($('view-locks'))
  const l = view.sections.locks || { deploy: [], repos: [] }
  root.append(el('h2', {}, 'Deploy locks'))
  const dt = el('table', { id: 'deploy-locks' }, el('tr', {}, ['Env', 'Lock', 'Holder', 'Since', 'Expires', 'Epoch', ''].map((h) => el('th', {}, h))))
  for (const d of l.deploy) {
    if (d.error) { dt.append(el('tr', {}, el('td', {}, d.env), el('td', { colspan: 7, class: 'err' }, `${d.error.code}: ${d.error.message}`))); continue }
    const h = d.held
    dt.append(el('tr', { data: { env: d.env, held: h ? 1 : 0 } },
      el('td', {}, d.env),
      el('td', { class: 'mono' }, d.location),
      el('td', { class: 'holder' }, h ? [h.description, h.runId && !h.description.includes(h.runId) ? ` [run ${h.runId}]` : '', h.stale ? [' ', badge('stale')] : ''] : el('span', { class: 'muted' }, 'free')),
      el('td', {}, h?.acquiredAtMs ? age(h.acquiredAtMs) : ''),
      el('td', {}, h?.expiresAtMs ? ['expires ', age(h.expiresAtMs, { until: true })] : ''),
      el('td', { class: 'num epoch' }, h ? h.epoch : ''),
      el('td', {}, h ? el('button', { type: 'button', class: h.stale ? 'danger' : '', data: { act: 'unlock-deploy', env: d.env }, on: { click: () => act('unlock', { kind: 'deploy', env: d.env }, { confirm: `Clear the deploy lock of ${d.env}, held by ${h.description}? Only do this when that run is really gone.` }) } }, 'Unlock') : '')))
  }
  root.append(dt)
  for (const r of l.repos) root.append(repoPanel(r))
  if (!l.repos.length) root.append(el('p', { class: 'muted' }, 'No shared repository shown: start the hub with --repo <dir>.'))
}

/** Each install in progress in `r`: its lock (`repo status` lists it), the holder in the words of `nanokit lock status`, the waiters. */
function installingOf(r) {
  const now = Date.now()
  return r.status.locks.map((l, i) => {
    const file = l.path.split('/').pop()
    const dot = file.lastIndexOf('.')
    return {
      lock: file, package: (dot > 0 ? file.slice(0, dot) : file).replaceAll('+', '/'), holder: r.holders[i], stale: l.stale, waiters: l.waiters,
      sameHost: l.sameHost, holderAlive: l.holderAlive, acquiredAtMs: l.info?.acquiredAtMs, heartbeatAtMs: now - l.heartbeatAgeMs,
    }
  })
}

function repoPanel(r) {
  const p = el('div', { class: 'panel repo', data: { dir: r.dir } }, el('h2', {}, 'Repository ', el('code', {}, r.dir)))
  if (r.error) return add(p, [el('div', { class: 'alert' }, `${r.error.code}: ${r.error.message}`)]), p
  const s = r.status
  // What else `repo status` reports (the store, gc candidates, …), as it comes, in units.
  for (const [k, v] of Object.entries(s)) {
    if (['dir', 'installed', 'locks', 'leftovers', 'staging'].includes(k) || v == null) continue
    const group = typeof v === 'object' && !Array.isArray(v)
    const fields = group ? Object.entries(v) : [[k, v]]
    p.append(el('div', { class: 'kvline', data: { field: k } }, group ? el('b', {}, `${field(k, v)[0]}:`) : '', fields.map(([fk, fv]) => {
      const [label, value] = field(fk, fv)
      return el('span', { data: { field: fk }, title: `${fk}: ${Array.isArray(fv) ? fv.join(', ') : fv}` }, el('b', {}, label), value)
    })))
  }
  const installing = installingOf(r)
  p.append(el('h3', {}, `Installing now (${installing.length})`))
  const it = el('table', { class: 'installing' }, el('tr', {}, ['Package', 'Holder', 'Alive', 'Since', 'Heartbeat', 'Waiters', ''].map((h) => el('th', {}, h))))
  for (const i of installing) {
    it.append(el('tr', { data: { package: i.package, waiters: i.waiters } },
      el('td', { class: 'mono' }, i.package),
      el('td', { class: 'holder' }, i.holder ?? 'unreadable record', i.stale ? [' ', badge('stale')] : ''),
      el('td', {}, i.holderAlive == null ? (i.sameHost ? '' : 'other host') : i.holderAlive ? 'yes' : 'no'),
      el('td', {}, i.acquiredAtMs ? age(i.acquiredAtMs) : ''),
      el('td', {}, age(i.heartbeatAtMs), ' ago'),
      el('td', { class: 'num waiters' }, i.waiters),
      el('td', {}, i.stale ? el('button', { type: 'button', class: 'danger', on: { click: () => act('unlock', { kind: 'repo', repo: r.dir, lock: i.lock }, { confirm: `Break the stale lock of ${i.package}, held by ${i.holder}?` }) } }, 'Break') : '')))
  }
  if (!installing.length) it.append(el('tr', {}, el('td', { colspan: 7, class: 'muted' }, 'none')))
  p.append(it)
  p.append(el('h3', {}, `Installed (${s.installed.length})`))
  const inst = el('table', { class: 'installed' }, el('tr', {}, ['Package', 'Alias', 'Installed', 'Last used', 'Verified'].map((h) => el('th', {}, h))))
  for (const i of s.installed) {
    inst.append(el('tr', { data: { specifier: i.specifier } }, el('td', { class: 'mono' }, i.specifier), el('td', { class: 'mono' }, i.alias), el('td', {}, when(i.installedAtMs)), el('td', {}, i.lastUsedMs ? [age(i.lastUsedMs), ' ago'] : ''), el('td', {}, i.verified ? 'yes' : badge('modified', 'failed'))))
  }
  p.append(inst)
  const staging = s.staging || []
  p.append(el('h3', {}, `Staging (${staging.length})`))
  const stt = el('table', { class: 'staging' }, el('tr', {}, ['Directory', 'Owner', 'Owner alive', 'Orphaned'].map((h) => el('th', {}, h))))
  for (const e of staging) {
    const o = e.owner || {}
    stt.append(el('tr', {}, el('td', { class: 'mono' }, e.path), el('td', {}, o.pid != null ? `pid ${o.pid}${o.hostname ? ` on ${o.hostname}` : ''}` : 'unknown'), el('td', {}, e.ownerAlive == null ? '?' : e.ownerAlive ? 'yes' : 'no'), el('td', {}, e.orphaned ? badge('orphaned', 'stale') : e.trash ? 'trash' : 'no')))
  }
  p.append(stt)
  if ((s.leftovers || []).length) {
    p.append(el('h3', {}, `Leftovers of interrupted installs (${s.leftovers.length})`), el('ul', {}, s.leftovers.map((x) => el('li', { class: 'mono' }, x))))
  }
  return p
}

// ---- state (key/value) ------------------------------------------------------------------

const stateUi = { prefix: '' }
renderers.state = () => {
  const root = $('view-state')
  const had = document.activeElement?.id === 'kv-prefix'
  clear(root)
  const s = view.sections.state || { agents: [] }
  const prefix = el('input', { id: 'kv-prefix', type: 'search', placeholder: 'key prefix', value: stateUi.prefix, on: { input: () => { stateUi.prefix = prefix.value; renderers.state() } } })
  root.append(el('div', { class: 'logbar' }, el('b', {}, 'State '), el('span', { class: 'muted' }, `${s.backend ?? ''} · ${s.location ?? ''}`), prefix))
  if (had) { prefix.focus(); prefix.setSelectionRange(prefix.value.length, prefix.value.length) }
  if (s.error) root.append(el('div', { class: 'alert' }, `${s.error.code}: ${s.error.message}`))
  for (const a of s.agents) {
    const p = el('div', { class: 'panel agent', data: { agent: a.agent } }, el('h2', {}, 'agent ', el('code', {}, a.agent)))
    if (a.error) { p.append(el('div', { class: 'alert' }, `${a.error.code}: ${a.error.message}`)); root.append(p); continue }
    const keys = a.keys.filter((k) => k.key.startsWith(stateUi.prefix))
    const groups = {}
    for (const k of keys) (groups[k.key.includes(':') ? k.key.split(':')[0] + ':' : '(no prefix)'] ||= []).push(k)
    p.append(el('h3', {}, `Keys (${keys.length}${a.keyCount > a.keys.length ? ` of ${a.keyCount}, first ${a.keys.length} shown` : ''})`))
    const t = el('table', { class: 'keys' }, el('tr', {}, ['Key', 'Value', 'Updated'].map((h) => el('th', {}, h))))
    for (const [g, ks] of Object.entries(groups)) {
      t.append(el('tr', { class: 'group' }, el('td', { colspan: 3 }, el('b', {}, g), el('span', { class: 'muted' }, ` ${ks.length}`))))
      for (const k of ks) t.append(el('tr', { data: { key: k.key } }, el('td', { class: 'mono' }, k.key), el('td', { class: 'kv-val mono' }, k.value), el('td', {}, age(k.updatedAtMs), ' ago')))
    }
    p.append(t)
    p.append(el('h3', {}, `Named locks (${a.locks.length})`))
    const lt = el('table', { class: 'kv-locks' }, el('tr', {}, ['Lock', 'Holder', 'Held for', 'Expires', ''].map((h) => el('th', {}, h))))
    for (const l of a.locks) {
      lt.append(el('tr', { data: { lock: l.name } }, el('td', { class: 'mono' }, l.name), el('td', {}, l.holder), el('td', {}, age(l.acquiredAtMs)), el('td', {}, age(l.expiresAtMs, { until: true })),
        el('td', {}, el('button', { type: 'button', on: { click: () => act('unlock', { kind: 'state', agent: a.agent, name: l.name }, { confirm: `Force-unlock ${l.name}, held by ${l.holder}?` }) } }, 'Unlock'))))
    }
    p.append(lt)
    root.append(p)
  }
  if (!s.agents.length && !s.error) root.append(el('p', { class: 'muted' }, 'No state yet (nanokit state set …, or JS openState()).'))
}

// ---- drift ----------------------------------------------------------------------------

renderers.drift = () => {
  const root = clear($('view-drift'))
  for (const d of view.sections.drift || []) {
    const p = el('div', { class: 'panel', data: { env: d.env, drifted: d.error ? 'error' : String(d.drifted) } })
    const head = el('div', { class: 'envbar' }, el('b', {}, `environment ${d.env}`), d.error ? '' : badge(d.drifted ? 'drifted' : 'in sync', d.drifted ? 'failed' : 'ok'), el('span', { class: 'grow' }),
      d.drifted ? el('button', { type: 'button', class: 'primary', data: { act: 'restore', env: d.env }, on: { click: () => act('restore', { env: d.env }) } }, 'Restore') : '')
    p.append(head)
    if (d.error) p.append(el('div', { class: 'alert' }, `${d.error.code}: ${d.error.message}`))
    else if (!d.drifted) p.append(el('p', { class: 'muted' }, 'Every recorded service is running with its configuration.'))
    else {
      const t = el('table', { class: 'drift' }, el('tr', {}, ['Service', 'Kind', 'Detail'].map((h) => el('th', {}, h))))
      for (const i of d.items) t.append(el('tr', { data: { service: i.service, kind: i.kind } }, el('td', {}, i.service), el('td', {}, badge(i.kind, 'failed')), el('td', {}, i.detail)))
      p.append(t)
    }
    root.append(p)
  }
}

// ---- start -----------------------------------------------------------------------------

route()
connect()
