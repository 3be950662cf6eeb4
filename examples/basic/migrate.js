// Migration hook (api's prestart, on the host): records the schema version
// in the db. Idempotent: running it twice leaves version 2.
const url = process.env.DB_URL
fetch(`${url}/schema_version`)
  .then((r) => r.json())
  .then(async (v) => {
    if (v === 2) return console.log('schema is up to date (version 2)')
    await fetch(`${url}/schema_version`, { method: 'PUT', body: '2' })
    console.log(`migrated schema from ${v ?? 0} to 2`)
  })
  .catch((e) => {
    console.error(`migration failed: ${e.message}`)
    process.exit(1)
  })
