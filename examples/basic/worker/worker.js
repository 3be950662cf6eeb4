// The worker: calls the api every INTERVAL_MS and logs the result.
const every = Number(process.env.INTERVAL_MS || 1000)
setInterval(async () => {
  try {
    const r = await fetch(`${process.env.API_URL}/count`)
    console.log(`worker: count is now ${(await r.json()).count}`)
  } catch (e) {
    console.error(`worker: api unreachable: ${e.message}`)
  }
}, every)
console.log(`worker started, polling ${process.env.API_URL} every ${every} ms`)
