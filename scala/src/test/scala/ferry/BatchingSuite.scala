package ferry

import scala.collection.mutable.ArrayBuffer

import com.google.protobuf.ByteString
import org.apache.spark.sql.Row
import org.apache.spark.sql.catalyst.InternalRow
import org.apache.spark.sql.catalyst.expressions.GenericInternalRow
import org.apache.spark.sql.catalyst.util.GenericArrayData
import org.apache.spark.sql.types._
import org.apache.spark.unsafe.types.UTF8String
import org.scalatest.funsuite.AnyFunSuite

class BatchingSuite extends AnyFunSuite with SparkSuite {

  private val schema = StructType(Seq(StructField("id", LongType), StructField("s", StringType),
    StructField("ad", ArrayType(DoubleType)), StructField("b", BinaryType)))

  private def row(i: Int): InternalRow = new GenericInternalRow(Array[Any](i.toLong,
    UTF8String.fromString("x" * (i % 97)), new GenericArrayData(Array.tabulate[Any](i % 13)(_.toDouble)),
    Array.fill[Byte](i % 31)(1)))

  private def withAllocator[T](f: org.apache.arrow.memory.BufferAllocator => T): T = {
    val a = ArrowBatches.newAllocator("batching-test", FerryConf.defaults)
    try f(a) finally a.close() // close() fails if a buffer leaked
  }

  test("batches never exceed the rows cap nor the bytes cap, and rows come back in order") {
    for ((maxRows, maxBytes) <- Seq((50, 1L << 20), (100000, 8192L), (37, 4096L), (1, 1L << 20))) {
      withAllocator { alloc =>
        val writer = new ArrowBatches.Writer(schema, alloc, maxRows, maxBytes)
        val reader = new ArrowBatches.Reader(ArrowBatches.serializeSchema(writer.arrowSchema), alloc, "")
        try {
          val msgs = writer.batches(Iterator.tabulate(2000)(row)).toVector
          assert(msgs.length >= 2000 / maxRows)
          val back = ArrayBuffer.empty[Row]
          msgs.foreach { m =>
            assert(m.size() <= maxBytes, s"message of ${m.size()} bytes > cap $maxBytes")
            val rows = reader.externalRows(m).toVector
            assert(rows.nonEmpty && rows.length <= maxRows)
            back ++= rows
          }
          assert(back.map(_.getLong(0)) == (0 until 2000).map(_.toLong))
          back.foreach { r =>
            val i = r.getLong(0).toInt
            assert(r.getString(1) == "x" * (i % 97))
            assert(r.getSeq[Double](2) == Seq.tabulate(i % 13)(_.toDouble))
            assert(r.getAs[Array[Byte]](3).length == i % 31)
          }
          // Caps small enough to matter: the bytes cap really split batches.
          if (maxBytes == 8192L) assert(msgs.length > 2000 / 1000)
        } finally {
          reader.close()
          writer.close()
        }
      }
    }
  }

  test("fixed-width rows: the bytes cap becomes a row cap, and messages stay under it") {
    val fixed = StructType(Seq(StructField("id", LongType), StructField("x", DoubleType), StructField("f", BooleanType)))
    for ((maxRows, maxBytes) <- Seq((100000, 4096L), (10, 1L << 20), (100000, 1L))) {
      withAllocator { alloc =>
        val writer = new ArrowBatches.Writer(fixed, alloc, maxRows, maxBytes)
        val reader = new ArrowBatches.Reader(ArrowBatches.serializeSchema(writer.arrowSchema), alloc, "")
        try {
          val rows = Iterator.tabulate(5000)(i => new GenericInternalRow(Array[Any](i.toLong, i * 0.25,
            if (i % 3 == 0) null else i % 2 == 0)): InternalRow)
          var next = 0L
          var batches = 0
          writer.batches(rows).foreach { m =>
            if (maxBytes > 1) assert(m.size() <= maxBytes, s"message of ${m.size()} bytes > cap $maxBytes")
            val got = reader.externalRows(m).toVector
            assert(got.nonEmpty && got.length <= maxRows)
            got.foreach { r =>
              assert(r.getLong(0) == next && r.getDouble(1) == next * 0.25)
              assert(if (next % 3 == 0) r.isNullAt(2) else r.getBoolean(2) == (next % 2 == 0))
              next += 1
            }
            batches += 1
          }
          assert(next == 5000)
          if (maxBytes == 4096L) assert(batches > 5000 * 18 / 4096)
          if (maxBytes == 1L) assert(batches == 5000) // one row per message when even one row is over the cap
        } finally {
          reader.close()
          writer.close()
        }
      }
    }
  }

  test("rows from a reused UnsafeRow (as scans and shuffles hand them over) split by the bytes cap come back intact") {
    // One projection, one row object rewritten on every next(): the writer reads binaries in
    // place and writes the row that overflows a batch into the next one before taking another.
    val bin = StructType(Seq(StructField("id", LongType), StructField("b", BinaryType), StructField("s", StringType)))
    val project = org.apache.spark.sql.catalyst.expressions.UnsafeProjection.create(bin)
    def payload(i: Int): Array[Byte] = Array.tabulate[Byte]((i * 7919) % 3000)(j => (i * 31 + j).toByte)
    def rows = Iterator.tabulate(600) { i =>
      project(new GenericInternalRow(Array[Any](i.toLong, if (i % 11 == 5) null else payload(i),
        UTF8String.fromString("r" * (i % 5)))))
    }
    assert(rows.take(2).toSeq.map(System.identityHashCode).distinct.length == 1, "the projection reuses its row")
    for ((maxRows, maxBytes) <- Seq((1000, 8192L), (3, 1L << 20), (1000, 2048L), (1000, 1L))) {
      withAllocator { alloc =>
        val writer = new ArrowBatches.Writer(bin, alloc, maxRows, maxBytes)
        val reader = new ArrowBatches.Reader(ArrowBatches.serializeSchema(writer.arrowSchema), alloc, "")
        try {
          val msgs = writer.batches(rows).toVector
          val back = msgs.flatMap { m =>
            val got = reader.externalRows(m).toVector
            assert(got.nonEmpty && got.length <= maxRows)
            // Over the cap only when one row alone is larger than it.
            if (got.length > 1) assert(m.size() <= maxBytes, s"message of ${m.size()} bytes > cap $maxBytes")
            got
          }
          assert(back.map(_.getLong(0)) == (0 until 600).map(_.toLong))
          back.foreach { r =>
            val i = r.getLong(0).toInt
            if (i % 11 == 5) assert(r.isNullAt(1)) else assert(r.getAs[Array[Byte]](1).sameElements(payload(i)), s"row $i")
            assert(r.getString(2) == "r" * (i % 5))
          }
          if (maxBytes == 8192L) assert(msgs.length > 600 * 1500 / 8192)
          if (maxBytes == 1L) assert(msgs.length == 600)
        } finally {
          reader.close()
          writer.close()
        }
      }
    }
  }

  test("Run responses parse from one array, small and over 4 MB, and a cut-off message is an INTERNAL status") {
    import ferry.proto.v1.{Batch, RunResponse}
    val m = WorkerClient.RunResponseMarshaller
    for (size <- Seq(0, 10, 5 << 20)) {
      val data = Array.tabulate[Byte](size)(i => (i * 13).toByte)
      val resp = RunResponse.newBuilder().setBatch(Batch.newBuilder().setArrow(ByteString.copyFrom(data))).build()
      val back = m.parse(m.stream(resp))
      assert(back.getBatch.getArrow.toByteArray.sameElements(data), s"$size bytes")
      // A plain stream (no known length) parses too.
      assert(m.parse(new java.io.ByteArrayInputStream(resp.toByteArray)) == resp)
    }
    // One copy, from the transport into one array: the parsed batch is a view of that array.
    val wire = RunResponse.newBuilder().setBatch(Batch.newBuilder().setArrow(ByteString.copyFrom(Array[Byte](1, 2, 3))))
      .build().toByteArray
    val parsed = m.parse(wire)
    wire(wire.length - 1) = 9
    assert(parsed.getBatch.getArrow.byteAt(2) == 9, "the batch bytes alias the message array")
    val full = RunResponse.newBuilder().setBatch(Batch.newBuilder().setArrow(ByteString.copyFrom(new Array[Byte](100))))
      .build().toByteArray
    val cut = intercept[io.grpc.StatusRuntimeException](m.parse(new java.io.ByteArrayInputStream(full.take(50))))
    assert(cut.getStatus.getCode == io.grpc.Status.Code.INTERNAL)
    // A stream whose stated length is not what it holds.
    final class Stated(data: Array[Byte], stated: Int) extends java.io.ByteArrayInputStream(data) with io.grpc.KnownLength {
      override def available(): Int = stated
    }
    val short = intercept[io.grpc.StatusRuntimeException](m.parse(new Stated(full, full.length + 10)))
    assert(short.getStatus.getCode == io.grpc.Status.Code.INTERNAL)
    assert(short.getStatus.getDescription.contains(s"stated ${full.length + 10} bytes but ended after ${full.length}"))
    val long = intercept[io.grpc.StatusRuntimeException](m.parse(new Stated(full, full.length - 10)))
    assert(long.getStatus.getDescription.contains(s"stated ${full.length - 10} bytes but ran past them"))
  }

  test("a single row larger than the bytes cap travels alone") {
    withAllocator { alloc =>
      val writer = new ArrowBatches.Writer(schema, alloc, 1000, 4096)
      try {
        val big = new GenericInternalRow(Array[Any](1L, UTF8String.fromString("y" * 10000), null, null))
        val msgs = writer.batches(Iterator(row(0), big, row(2))).toVector
        assert(msgs.length == 3)
        assert(msgs(1).size() > 10000)
      } finally writer.close()
    }
  }

  test("a huge row count crosses many batches to the worker and back, in order") {
    val n = 300000
    withConf(FerryConf.BatchMaxRows -> "1000") {
      val df = spark.range(0, n, 1, 1).toDF("x")
      val ids = new PythonStage().setStageName("identity").transform(df).collect().map(_.getLong(0))
      assert(ids.length == n)
      assert(ids.toSeq == (0L until n.toLong))
    }
    // The same through the client directly: 300 batches in, 300 out, in order, metrics agree.
    val conf = FerryConf.get(spark).copy(batchMaxRows = 1000)
    val rowSchema = StructType(Seq(StructField("x", LongType)))
    withAllocator { alloc =>
      WorkerPool.get(conf).withClient { client =>
        val writer = new ArrowBatches.Writer(rowSchema, alloc, conf.batchMaxRows, conf.batchMaxBytes)
        val rows = Iterator.range(0, n).map(i => new GenericInternalRow(Array[Any](i.toLong)): InternalRow)
        val run = client.run("identity", "{}", ArrowBatches.serializeSchema(writer.arrowSchema), writer.batches(rows), 4)
        val reader = new ArrowBatches.Reader(run.outputSchema, alloc, "identity")
        try {
          var next = 0L
          var batches = 0
          run.foreach { m =>
            reader.rows(m).foreach { r => assert(r.getLong(0) == next); next += 1 }
            batches += 1
          }
          assert(next == n && batches == n / 1000)
          assert(run.completed)
          assert(run.metrics.exists(m => m.getBatchesIn == n / 1000 && m.getRowsOut == n))
        } finally {
          run.close()
          reader.close()
          writer.close()
        }
      }
    }
  }

  test("no more than maxInFlight batches are sent ahead of the answers (back-pressure)") {
    val conf = FerryConf.get(spark)
    val rowSchema = StructType(Seq(StructField("x", DoubleType)))
    for (maxInFlight <- Seq(1, 3)) {
      withAllocator { alloc =>
        WorkerPool.get(conf).withClient { client =>
          val writer = new ArrowBatches.Writer(rowSchema, alloc, 10, 1 << 20)
          var consumed = 0
          var pulled = 0
          var maxAhead = 0
          val batches = writer.batches(Iterator.range(0, 200).map(i => new GenericInternalRow(Array[Any](i.toDouble)): InternalRow))
          val inputs = new Iterator[ByteString] {
            def hasNext: Boolean = batches.hasNext
            def next(): ByteString = {
              maxAhead = math.max(maxAhead, pulled - consumed)
              assert(pulled - consumed < maxInFlight, s"pulled $pulled batches with $consumed answered")
              pulled += 1
              batches.next()
            }
          }
          val run = client.run("slow", """{"seconds": 0.01}""", ArrowBatches.serializeSchema(writer.arrowSchema),
            inputs, maxInFlight)
          try run.foreach(_ => consumed += 1)
          finally {
            run.close()
            writer.close()
          }
          assert(consumed == 20 && pulled == 20)
          assert(maxAhead == maxInFlight - 1, s"the stream never filled its window ($maxAhead ahead)")
        }
      }
    }
  }

  test("a Run whose worker answers nothing within spark.ferry.run.responseTimeout fails and the worker is replaced") {
    val conf = FerryConf.get(spark).copy(runResponseTimeoutMs = 1500,
      workerLogDir = Some(TestSpark.newDir("stuck-pool").getAbsolutePath))
    val pool = WorkerPool.get(conf)
    try withAllocator { alloc =>
      val writer = new ArrowBatches.Writer(StructType(Seq(StructField("x", DoubleType))), alloc, 10, 1 << 20)
      var pid = -1L
      val e = intercept[WorkerUnavailableException] {
        pool.withClient { client =>
          pid = pool.pids.head
          val run = client.run("slow", """{"seconds": 60}""", ArrowBatches.serializeSchema(writer.arrowSchema),
            writer.batches(Iterator.range(0, 30).map(i => new GenericInternalRow(Array[Any](i.toDouble)): InternalRow)), 2)
          try run.foreach(_ => ()) finally { run.close(); writer.close() }
        }
      }
      assert(e.getMessage.contains("Stage 'slow'") && e.getMessage.contains("answered nothing for 1.5s") &&
        e.getMessage.contains(FerryConf.RunResponseTimeout), e.getMessage)
      assert(!pool.pids.contains(pid), "the stuck worker was given back to the pool")
      pool.withClient(c => assert(c.listStages().nonEmpty)) // a fresh worker serves the next borrower
    } finally pool.stop()
  }

  test("numeric columns read straight from Arrow memory give back the values and nulls written") {
    val numeric = StructType(Seq(StructField("l", LongType), StructField("d", DoubleType),
      StructField("i", IntegerType), StructField("f", FloatType)))
    def value(r: Int): InternalRow = new GenericInternalRow(Array[Any](
      if (r % 7 == 3) null else r.toLong * 1000003L - 5, if (r % 5 == 1) null else r * 0.25 - 1e300 / (r + 1),
      if (r % 11 == 0) null else -r, if (r % 2 == 0) null else r.toFloat / 3))
    for (n <- Seq(0, 1, 8, 9, 1000)) withAllocator { alloc =>
      val writer = new ArrowBatches.Writer(numeric, alloc, 1 << 20, 1L << 24)
      val reader = new ArrowBatches.Reader(ArrowBatches.serializeSchema(writer.arrowSchema), alloc, "")
      try writer.batches(Iterator.tabulate(n)(value)).foreach { m =>
        val batch = reader.load(m)
        for (c <- 0 until 4) {
          val fast = batch.column(c)
          assert(fast.isInstanceOf[FixedWidthColumn])
          for (r <- 0 until batch.numRows()) {
            val expected = value(r)
            assert(fast.isNullAt(r) == expected.isNullAt(c), s"null at row $r col $c")
            if (!expected.isNullAt(c)) c match {
              case 0 => assert(fast.getLong(r) == expected.getLong(0))
              case 1 => assert(fast.getDouble(r) == expected.getDouble(1))
              case 2 => assert(fast.getInt(r) == expected.getInt(2))
              case _ => assert(fast.getFloat(r) == expected.getFloat(3))
            }
          }
          assert(fast.numNulls == (0 until batch.numRows()).count(r => value(r).isNullAt(c)))
        }
      } finally { reader.close(); writer.close() }
    }
  }
}
