// The HTTP service: /health, and /count which increments a counter in db.
const http = require('node:http')
const db = process.env.DB_URL

http
  .createServer(async (req, res) => {
    try {
      if (req.url === '/health') return res.end('ok')
      if (req.url === '/count') {
        const n = ((await (await fetch(`${db}/count`)).json()) ?? 0) + 1
        await fetch(`${db}/count`, { method: 'PUT', body: String(n) })
        return res.end(JSON.stringify({ count: n }))
      }
      res.statusCode = 404
      res.end('not found')
    } catch (e) {
      res.statusCode = 502
      res.end(e.message)
    }
  })
  .listen(Number(process.env.PORT), '127.0.0.1', () => console.log(`api listening on ${process.env.PORT}`))
