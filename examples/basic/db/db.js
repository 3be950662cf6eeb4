// A tiny JSON store over HTTP: GET/PUT /<key>. Data lives in the `data`
// volume (NK_VOLUME_DATA) so it survives restarts.
const http = require('node:http')
const fs = require('node:fs')
const path = require('node:path')

const dir = process.env.NK_VOLUME_DATA || path.join(__dirname, '.data')
fs.mkdirSync(dir, { recursive: true })
const file = path.join(dir, 'db.json')
const load = () => (fs.existsSync(file) ? JSON.parse(fs.readFileSync(file, 'utf8')) : {})
const save = (db) => {
  fs.writeFileSync(file + '.tmp', JSON.stringify(db))
  fs.renameSync(file + '.tmp', file)
}

http
  .createServer((req, res) => {
    const key = decodeURIComponent(req.url.slice(1))
    if (req.method === 'PUT') {
      let body = ''
      req.on('data', (c) => (body += c))
      req.on('end', () => {
        const db = load()
        db[key] = JSON.parse(body || 'null')
        save(db)
        res.end('{"ok":true}')
      })
      return
    }
    const db = load()
    res.setHeader('content-type', 'application/json')
    res.end(JSON.stringify(key ? db[key] ?? null : db))
  })
  .listen(Number(process.env.PORT), '127.0.0.1', () => console.log(`db listening on ${process.env.PORT}`))
