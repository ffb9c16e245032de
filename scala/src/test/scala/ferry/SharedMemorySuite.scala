package ferry

import java.nio.file.{Files, Paths}

import scala.jdk.CollectionConverters._

import org.apache.spark.sql.Row
import org.apache.spark.sql.types._
import org.scalatest.funsuite.AnyFunSuite

/** Run batches through shared memory between the JVM and the workers it starts (real workers, real files). */
class SharedMemorySuite extends AnyFunSuite with SparkSuite {

  private val shm = Paths.get("/dev/shm")

  /** Files this JVM left under /dev/shm: none, once each worker has opened (or refused) them. */
  private def leftFiles: Seq[String] = {
    val prefix = s"ferry-${ProcessHandle.current().pid()}-"
    if (!Files.isDirectory(shm)) Nil
    else Files.list(shm).iterator().asScala.map(_.getFileName.toString).filter(_.startsWith(prefix)).toSeq
  }

  /** Equality without printing a 200,000-element vector when it fails. */
  private def same[T](a: Seq[T], b: Seq[T]): Boolean = a == b

  private def runIdentity(conf: FerryConf, xs: Seq[Double], batchRows: Int): (Seq[Double], Long, Boolean) =
    WorkerPool.get(conf).withClient(runOn(_, conf, "identity", "{}", xs, batchRows))

  /** Runs `stage` over one double column `x`; (the first output column, batches shared, client's state). */
  private def runOn(client: WorkerClient, conf: FerryConf, stage: String, params: String, xs: Seq[Double],
      batchRows: Int, stopAfter: Option[Int] = None): (Seq[Double], Long, Boolean) = {
    val schema = StructType(Seq(StructField("x", DoubleType)))
    val alloc = ArrowBatches.newAllocator("shm-test", conf)
    val writer = new ArrowBatches.Writer(schema, alloc, batchRows, 64L << 20)
    try {
      val rows = xs.iterator.map(v => org.apache.spark.sql.catalyst.InternalRow(v))
      val stream = client.run(stage, params, ArrowBatches.serializeSchema(writer.arrowSchema),
        writer.batches(rows), maxInFlight = 4)
      val reader = new ArrowBatches.Reader(stream.outputSchema, alloc, stage)
      try {
        val batches = stopAfter.fold(stream: Iterator[com.google.protobuf.ByteString])(stream.take)
        val back = batches.flatMap(m => reader.externalRows(m).map(_.getDouble(0)).toVector).toVector
        if (stopAfter.isEmpty) assert(stream.completed)
        (back, stream.sharedBatches, client.usesSharedMemory)
      } finally {
        stream.close()
        reader.close()
      }
    } finally {
      writer.close()
      alloc.close()
    }
  }

  test("batches to and from a local worker go through shared memory, equal to the socket's") {
    assume(Files.isWritable(shm), "no writable /dev/shm")
    val xs = Seq.tabulate(200000)(i => math.sin(i * 0.001) * 1e6 + i)
    val viaShm = runIdentity(FerryConf.get(spark), xs, 10000)
    assert(same(viaShm._1, xs))
    assert(viaShm._3, "the worker did not take the shared files")
    assert(viaShm._2 == 40, s"20 batches each way should use shared memory, ${viaShm._2} did")
    assert(leftFiles.isEmpty, s"files left under /dev/shm: $leftFiles")
    // Again on the same client: the worker knows the pair by id, the files are gone by now.
    assert(runIdentity(FerryConf.get(spark), xs, 10000)._2 == 40)
    withConf(FerryConf.SharedMemoryBytes -> "0") {
      val viaSocket = runIdentity(FerryConf.get(spark), xs, 10000)
      assert(same(viaSocket._1, xs) && viaSocket._2 == 0 && !viaSocket._3)
    }
  }

  test("a batch larger than the shared file travels over the socket; the rest still use the file") {
    assume(Files.isWritable(shm), "no writable /dev/shm")
    withConf(FerryConf.SharedMemoryBytes -> "64k") {
      // 1,000-row batches (8 KB) fit the 64 KB files, with room for the batches in flight each
      // way; 20,000-row ones (160 KB) do not fit at all.
      val small = runIdentity(FerryConf.get(spark), Seq.tabulate(20000)(_.toDouble), 1000)
      assert(same(small._1, Seq.tabulate(20000)(_.toDouble)) && small._2 == 40, s"${small._2} shared")
      val large = runIdentity(FerryConf.get(spark), Seq.tabulate(60000)(_ * 0.5), 20000)
      assert(same(large._1, Seq.tabulate(60000)(_ * 0.5)) && large._2 == 0, s"${large._2} shared")
    }
  }

  test("a DataFrame through PythonStage and Convolve gives the same rows with shared memory on and off") {
    val schema = StructType(Seq(StructField("id", LongType), StructField("real", DoubleType),
      StructField("imag", DoubleType)))
    val n = 50000
    val rows = (0 until n).map(i => Row(i.toLong, math.cos(i * 0.37), math.sin(i * 0.11)))
    val df = spark.createDataFrame(spark.sparkContext.parallelize(rows, 3), schema)
    def both(): (Seq[Row], Seq[Row]) = (
      new PythonStage().setStageName("identity").transform(df).collect().sortBy(_.getLong(0)).toSeq,
      new Convolve().setKernelReal(Array(0.5, -1.0, 2.0, 0.25)).setKernelImag(Array(0.0, 0.5, 0.0, -0.5)).setMode("full")
        .transform(df).collect().sortBy(_.getLong(0)).toSeq)
    val on = both()
    val off = withConf(FerryConf.SharedMemoryBytes -> "0")(both())
    assert(same(on._1, rows) && same(off._1, rows))
    assert(on._2.length == n + 3 && same(on._2, off._2))
    assert(leftFiles.isEmpty, s"files left under /dev/shm: $leftFiles")
  }

  test("a stream given up half-way leaves the files fit for the next stream of the same client") {
    assume(Files.isWritable(shm), "no writable /dev/shm")
    val conf = FerryConf.get(spark)
    WorkerPool.get(conf).withClient { client =>
      val xs = Seq.tabulate(100000)(i => i * 0.25 - 7.0)
      for (round <- 0 until 3) {
        // The worker is still answering the abandoned stream's queued batches (writing into its
        // own regions of the output file, reading inputs the next stream overwrites) while the
        // next stream runs on the same files.
        val partial = runOn(client, conf, "slow", """{"seconds": 0.02}""", xs, 5000, stopAfter = Some(2))
        assert(same(partial._1, xs.take(10000)), s"round $round: the abandoned stream's first outputs")
        val next = runOn(client, conf, "scale", """{"factor": -2}""", xs, 5000)
        assert(same(next._1, xs.map(_ * -2)), s"round $round: the next stream's outputs")
        assert(next._2 == 40 && next._3, s"round $round: ${next._2} batches shared")
      }
    }
  }

  test("files left by a JVM killed before its worker answered are deleted by the next one; nothing else is") {
    val dead = { val p = new ProcessBuilder("true").start(); p.waitFor(); p.pid() }
    assert(!ProcessHandle.of(dead).isPresent)
    val live = ProcessHandle.current().pid()
    def uuid = java.util.UUID.randomUUID().toString
    def file(dir: java.nio.file.Path, name: String, ageMs: Long): String = {
      val p = Files.createFile(dir.resolve(name))
      Files.setLastModifiedTime(p, java.nio.file.attribute.FileTime.fromMillis(System.currentTimeMillis() - ageMs))
      name
    }
    def names(dir: java.nio.file.Path) = Files.list(dir).iterator().asScala.map(_.getFileName.toString).toSeq.sorted
    val old = SharedFiles.StaleAfterMs + 5000
    val dir = Files.createTempDirectory("ferry-shm-sweep")
    val other = Files.createTempDirectory("ferry-shm-sweep")
    try {
      val debris = Seq(file(dir, s"ferry-$dead-$uuid-in", old), file(dir, s"ferry-$dead-$uuid-out", old))
      val kept = Seq(
        file(dir, s"ferry-$live-$uuid-in", old), // its process is running
        file(dir, s"ferry-$dead-$uuid-out", 1000), // young: a live client's files have names for one round trip
        file(dir, s"ferry-$dead-not-a-uuid-in", old), // not a name ferry makes
        file(dir, "someone-else", old))
      assert(SharedFiles.sweepStale(dir, System.currentTimeMillis()).sorted == debris.sorted)
      assert(names(dir) == kept.sorted)
      // The first files a JVM makes in a directory sweep it.
      val left = file(other, s"ferry-$dead-$uuid-out", old)
      val made = SharedFiles.create(other, 4096).get
      try {
        assert(!names(other).contains(left))
        assert(names(other).count(_.startsWith(s"ferry-$live-")) == 2, names(other))
      } finally made.close()
      assert(names(other).isEmpty)
    } finally Seq(dir, other).foreach { d =>
      Files.list(d).iterator().asScala.foreach(Files.delete(_))
      Files.delete(d)
    }
  }

  test("bad settings are refused with the key's name") {
    val e = intercept[IllegalArgumentException](FerryConf.fromMap(Map(FerryConf.SharedMemoryBytes -> "2g")))
    assert(e.getMessage.contains(FerryConf.SharedMemoryBytes) && e.getMessage.contains("between 0 (off) and 1g"))
  }

  test("regions go round the file and are freed by owner and index") {
    val r = new Regions(100)
    val (a, b) = (new Object, new Object)
    assert(r.alloc(40, a, 0).contains(0L) && r.alloc(40, a, 1).contains(40L))
    assert(r.alloc(40, b, 0).isEmpty)
    r.release(a, 1)
    assert(r.alloc(40, b, 0).contains(0L) && r.alloc(30, b, 1).isEmpty)
    r.release(b)
    r.release(a)
    assert(r.liveCount == 0 && r.alloc(100, a, 2).contains(0L) && r.alloc(1, a, 3).isEmpty)
    assert(r.alloc(0, a, 4).isEmpty && new Regions(10).alloc(11, a, 0).isEmpty)
  }

  test("regions never overlap under random use") {
    val rnd = new scala.util.Random(7)
    for (size <- Seq(64L, 1000L, 4096L)) {
      val r = new Regions(size)
      val owners = Array.fill(3)(new Object)
      val counters = Array.fill(3)(0L)
      var live = Map.empty[(Int, Long), (Long, Long)]
      for (_ <- 0 until 3000) {
        val o = rnd.nextInt(3)
        if (rnd.nextDouble() < 0.55) {
          val n = 1 + rnd.nextInt((size / 3).toInt)
          r.alloc(n, owners(o), counters(o)).foreach { start =>
            assert(start >= 0 && start + n <= size)
            live.values.foreach { case (s, e) => assert(start + n <= s || start >= e, "overlapping regions") }
            live += (o, counters(o)) -> (start, start + n)
          }
          counters(o) += 1
        } else {
          val below = rnd.nextLong(counters(o) + 1)
          r.release(owners(o), below)
          live = live.filterNot { case ((oo, i), _) => oo == o && i < below }
        }
        assert(r.liveCount == live.size)
      }
    }
  }
}
