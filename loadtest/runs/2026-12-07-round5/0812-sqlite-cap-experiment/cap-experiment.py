import sqlite3, os, time
def setup():
    for f in os.listdir('.'):
        if f.startswith('t.db'): os.unlink(f)
    c=sqlite3.connect('t.db', isolation_level=None)
    c.execute('pragma page_size=16384'); c.execute('pragma journal_mode=wal'); c.execute('pragma synchronous=normal')
    c.execute('pragma cache_size=-8192'); c.execute('pragma wal_autocheckpoint=2560')
    return c
blob=os.urandom(700)
def rows(a,b): return [(i,'x'*32,'http://127.0.0.1:1234','nar/'+'y'*52+'.nar',1,2) for i in range(a,b)]
def bodies(a,b): return [(i,1.0,'sha256:'+'z'*52,5,blob) for i in range(a,b)]
def rowdel(total=150000, cap=60000, batch=600):
    c=setup()
    c.execute('create table log(id integer primary key, h text not null, u text not null, n text not null, e int not null, v int not null)')
    c.execute('create table body(id integer primary key, l real not null, nh text not null, ns int not null, b blob not null)')
    nid=1; count=0; t0=None
    while nid<=total:
        if nid>cap and t0 is None: t0=time.process_time()
        c.execute('begin')
        c.executemany('insert or ignore into log values (?,?,?,?,?,?)',rows(nid,nid+batch))
        c.executemany('insert or ignore into body values (?,?,?,?,?)',bodies(nid,nid+batch))
        nid+=batch; count+=batch
        if count>cap:
            last=c.execute('select id from log order by id limit 1 offset ?',(count-cap-1,)).fetchone()[0]
            count-=c.execute('delete from log where id<=?',(last,)).rowcount
            c.execute('delete from body where id<=?',(last,))
        c.execute('commit')
    return (time.process_time()-t0)/(total-cap)*1e6
def gens(total=150000, cap=60000, batch=600, g=6000):
    c=setup(); nid=1; live=[]; t0=None
    while nid<=total:
        if nid>cap and t0 is None: t0=time.process_time()
        gi=(nid-1)//g
        c.execute('begin')
        if not live or live[-1]!=gi:
            c.execute(f'create table log{gi}(id integer primary key, h text not null, u text not null, n text not null, e int not null, v int not null)')
            c.execute(f'create table body{gi}(id integer primary key, l real not null, nh text not null, ns int not null, b blob not null)')
            live.append(gi)
        c.executemany(f'insert or ignore into log{gi} values (?,?,?,?,?,?)',rows(nid,nid+batch))
        c.executemany(f'insert or ignore into body{gi} values (?,?,?,?,?)',bodies(nid,nid+batch))
        nid+=batch
        if (len(live)-1)*g >= cap:
            o=live.pop(0); c.execute(f'drop table log{o}'); c.execute(f'drop table body{o}')
        c.execute('commit')
    return (time.process_time()-t0)/(total-cap)*1e6
def nodel(total=150000, batch=600):
    c=setup()
    c.execute('create table log(id integer primary key, h text not null, u text not null, n text not null, e int not null, v int not null)')
    c.execute('create table body(id integer primary key, l real not null, nh text not null, ns int not null, b blob not null)')
    nid=1; t0=None
    while nid<=total:
        if nid>60000 and t0 is None: t0=time.process_time()
        c.execute('begin')
        c.executemany('insert or ignore into log values (?,?,?,?,?,?)',rows(nid,nid+batch))
        c.executemany('insert or ignore into body values (?,?,?,?,?)',bodies(nid,nid+batch))
        nid+=batch
        c.execute('commit')
    return (time.process_time()-t0)/(total-60000)*1e6
for i in range(2):
    print(f'rowdel={rowdel():.2f} gens={gens():.2f} nodel={nodel():.2f}', flush=True)
