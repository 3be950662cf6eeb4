// The api: answers /health once the db answers, and proxies /db.
const http = require('http');
const db = process.env.DB_URL;
http
  .createServer((req, res) => {
    http
      .get(`${db}/health`, (r) => {
        res.writeHead(r.statusCode === 200 ? 200 : 503);
        res.end(`api ${require('os').hostname()} -> db ${r.statusCode}\n`);
      })
      .on('error', (e) => {
        res.writeHead(503);
        res.end(`db unreachable: ${e.message}\n`);
      });
  })
  .listen(7001);
